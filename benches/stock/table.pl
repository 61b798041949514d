# Array work: a sieve of Eratosthenes, repeated.
my ($n, $count) = (100000, 0);
for (1 .. @N@) {
    my @t = (1) x ($n + 1);
    for my $i (2 .. $n) {
        next unless $t[$i];
        $count++;
        for (my $j = $i * $i; $j <= $n; $j += $i) { $t[$j] = 0 }
    }
}
print "$count\n";
