# List work: a sieve of Eratosthenes, repeated.
proc sieve {n} {
    set t [lrepeat [expr {$n + 1}] 1]
    set count 0
    for {set i 2} {$i <= $n} {incr i} {
        if {[lindex $t $i]} {
            incr count
            for {set j [expr {$i * $i}]} {$j <= $n} {incr j $i} { lset t $j 0 }
        }
    }
    return $count
}
set count 0
for {set k 0} {$k < @N@} {incr k} { incr count [sieve 100000] }
puts $count
