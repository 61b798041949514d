# Field arithmetic over 10 million lines of numbers.
{ s += $1 * 2; if ($1 % 7 == 0) c++ } END { print s, c }
