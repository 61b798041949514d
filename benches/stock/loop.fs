\ Arithmetic loop: a running sum modulo a prime.
: run ( n -- s ) 0 swap 0 do i 7 * + 1000003 mod loop ;
@N@ run . cr
bye
