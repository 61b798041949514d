# Arithmetic loop: a running sum modulo a prime.
s = 0
for i in range(@N@):
    s = (s + i * 7) % 1000003
print(s)
