# List work: a sieve of Eratosthenes, repeated.
n, count = 100000, 0
for _ in range(@N@):
    t = [True] * (n + 1)
    for i in range(2, n + 1):
        if t[i]:
            count += 1
            for j in range(i * i, n + 1, i):
                t[j] = False
print(count)
