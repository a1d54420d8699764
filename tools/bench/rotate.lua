-- wrk script: POST the request bodies in $CLF_BENCH_BODY (one per line, e.g. JSON) in turn.
-- Every request is formatted once per wrk thread in init(), so the load generator does no
-- per-request work beyond picking the next string. init() runs after wrk has set the Host
-- header and the -H headers; each body gets its own copy of them, because wrk.format()
-- writes Content-Length into the table it is given.
local path = os.getenv("CLF_BENCH_BODY")
local requests = {}
local i = 0

function init(args)
  local f = assert(io.open(path or "", "rb"), "cannot open CLF_BENCH_BODY=" .. tostring(path))
  for line in f:lines() do
    if #line > 0 then
      local headers = {}
      for name, value in pairs(wrk.headers) do
        headers[name] = value
      end
      requests[#requests + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  f:close()
  assert(#requests > 0, "no request bodies in " .. tostring(path))
end

function request()
  i = i % #requests + 1
  return requests[i]
end
