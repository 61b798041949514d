-- A recursive CTE counting to @N@, summed.
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < @N@) SELECT sum(x * 7 % 1000003) FROM c;
