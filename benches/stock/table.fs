\ Array work: a sieve of Eratosthenes, repeated.
100000 constant n
create t n 1+ allot
: sieve ( -- c )
  t n 1+ 1 fill 0
  n 1+ 2 do
    t i + c@ if
      1+ i dup * n <= if n 1+ i dup * ?do 0 t i + c! j +loop then
    then
  loop ;
: run ( k -- c ) 0 swap 0 do sieve + loop ;
@N@ run . cr
bye
