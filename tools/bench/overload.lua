-- wrk script for the overload cell: POST the body in $CLF_BENCH_BODY (headers from wrk -H) and
-- time every answer by its status. wrk's own latency histogram mixes the quick 503s with the
-- accepted 200s, so each request carries its own X-Request-ID (the service echoes it): request()
-- notes when it went out, response() finds it by the echoed id. done() prints one line per
-- status and one for requests never answered, e.g.
--   OVERLOAD status=200 count=31234 p50=212.41 p90=301.2 p99=388.10 max=512.33
--   OVERLOAD pending=1000 pending_over_timeout=0 unmatched=0
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } clfbench_timespec;
int clock_gettime(int clk_id, clfbench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("clfbench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local path = os.getenv("CLF_BENCH_BODY")
local timeout_ms = tonumber(os.getenv("CLF_BENCH_TIMEOUT_MS") or "2000")
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  threads[#threads + 1] = thread
end

function init(args)
  local f = assert(io.open(path or "", "rb"), "cannot open CLF_BENCH_BODY=" .. tostring(path))
  payload = f:read("*a")
  f:close()
  n, sent, lat, count, unmatched = 0, {}, {}, {}, 0
  prefix = "ovl" .. thread_id .. "-"
  headers = {}
  for name, value in pairs(wrk.headers) do
    headers[name] = value
  end
end

function request()
  n = n + 1
  local rid = prefix .. n
  headers["X-Request-ID"] = rid
  sent[rid] = now_ms()
  return wrk.format("POST", nil, headers, payload)
end

function response(status, hdrs, body)
  count[status] = (count[status] or 0) + 1
  local rid = hdrs["x-request-id"] or hdrs["X-Request-ID"]
  local t0 = rid and sent[rid]
  if t0 then
    sent[rid] = nil
    -- flat (status, ms) pairs: wrk's thread:get() cannot copy a table of tables
    lat[#lat + 1] = status
    lat[#lat + 1] = now_ms() - t0
  else
    unmatched = unmatched + 1
  end
end

local function pct(sorted, p)
  if #sorted == 0 then return 0 end
  return sorted[math.max(1, math.ceil(p * #sorted))]
end

function done(summary, latency, requests)
  local all, counts, pending, late, nomatch = {}, {}, 0, 0, 0
  local t = now_ms()
  for _, thread in ipairs(threads) do
    for status, k in pairs(thread:get("count")) do
      counts[status] = (counts[status] or 0) + k
    end
    local pairs_ = thread:get("lat")
    for i = 1, #pairs_, 2 do
      local dst = all[pairs_[i]] or {}
      all[pairs_[i]] = dst
      dst[#dst + 1] = pairs_[i + 1]
    end
    for rid, t0 in pairs(thread:get("sent")) do
      -- wrk calls request() once per thread before the run starts: that id is never sent
      if not rid:match("%-1$") then
        pending = pending + 1
        if t - t0 > timeout_ms then late = late + 1 end
      end
    end
    nomatch = nomatch + thread:get("unmatched")
  end
  for status, k in pairs(counts) do
    local arr = all[status] or {}
    table.sort(arr)
    io.write(string.format("OVERLOAD status=%d count=%d p50=%.2f p90=%.2f p99=%.2f max=%.2f\n",
      status, k, pct(arr, 0.5), pct(arr, 0.9), pct(arr, 0.99), arr[#arr] or 0))
  end
  io.write(string.format("OVERLOAD pending=%d pending_over_timeout=%d unmatched=%d\n",
    pending, late, nomatch))
end
