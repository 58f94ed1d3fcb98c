--[[ noop: returns at once. Used by benchmarks/bench_core.py as the client's ceiling for
one script call, and by readiness checks.
KEYS: [1] any key (so the call routes like a real one). ARGV: none.
Returns: 1
]]
return 1
