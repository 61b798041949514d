-- Table work: a sieve of Eratosthenes, repeated.
local n, count = 100000, 0
for _ = 1, @N@ do
  local t = {}
  for i = 1, n do t[i] = true end
  for i = 2, n do
    if t[i] then
      count = count + 1
      for j = i * i, n, i do t[j] = false end
    end
  end
end
print(count)
