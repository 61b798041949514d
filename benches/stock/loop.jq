# Arithmetic loop: a running sum modulo a prime.
reduce range(0; @N@) as $i (0; (. + $i * 7) % 1000003)
