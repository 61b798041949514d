# Arithmetic loop: a running sum modulo a prime (in a proc, so it is byte-compiled with local variables).
proc run {n} {
    set s 0
    for {set i 0} {$i < $n} {incr i} { set s [expr {($s + $i * 7) % 1000003}] }
    return $s
}
puts [run @N@]
