# Function calls: naive recursive Fibonacci.
def fib: if . < 2 then . else (. - 1 | fib) + (. - 2 | fib) end;
@N@ | fib
