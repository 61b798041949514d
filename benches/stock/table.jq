# Array work: build an array, then index into it and sum, repeatedly.
[range(0; 1000) | . * 7 % 1009] as $t
| reduce range(0; @N@) as $i (0; (. + $t[$i % 1000]) % 1000003)
