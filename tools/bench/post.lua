-- wrk script: POST one pre-built request body read from $CLF_BENCH_BODY (headers come from wrk -H).
-- The body is read once per wrk thread, so the load generator does no per-request work.
local path = os.getenv("CLF_BENCH_BODY")
local f = assert(io.open(path, "rb"), "cannot open CLF_BENCH_BODY=" .. tostring(path))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
