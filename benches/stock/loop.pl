# Arithmetic loop: a running sum modulo a prime.
my $s = 0;
for my $i (1 .. @N@) { $s = ($s + $i * 7) % 1000003 }
print "$s\n";
