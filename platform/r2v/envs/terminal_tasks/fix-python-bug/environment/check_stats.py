from stats import mean, median

assert mean([1, 2, 3, 4]) == 2.5, mean([1, 2, 3, 4])
assert median([3, 1, 2]) == 2
print("ok")
