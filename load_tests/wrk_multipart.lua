-- wrk script for load_tests/bench.py: POST prebuilt multipart bodies (real image bytes) in turn.
--
--   wrk -t1 -c16 -d20s --latency -s load_tests/wrk_multipart.lua URL -- PATH BOUNDARY THINK_MS BODY_FILE...
--
-- PATH: the route to post to; BOUNDARY: the multipart boundary the bodies were written with; THINK_MS: mean of an
-- exponential pause after each response (0: none, a closed loop at full speed); BODY_FILE: complete multipart
-- bodies, each read once in init(), so that a request costs wrk no more than a string copy. done() prints one line
-- "WRK_JSON {...}" with the figures bench.py reads (latencies in microseconds).

local requests = {}
local index = 0
local think_ms = 0

function init(args)
  local path, boundary = args[1], args[2]
  think_ms = tonumber(args[3]) or 0
  local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
  for i = 4, #args do
    local file = assert(io.open(args[i], "rb"))
    local body = file:read("*a")
    file:close()
    requests[#requests + 1] = wrk.format("POST", path, headers, body)
  end
  math.randomseed(os.time() + #args)
  index = math.random(#requests) - 1
end

function request()
  if #requests == 0 then -- wrk checks the script by calling request() once before init()
    return wrk.format("GET", "/")
  end
  index = index % #requests + 1
  return requests[index]
end

function delay()
  if think_ms <= 0 then
    return 0
  end
  return -think_ms * math.log(1 - math.random())
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "latency_mean_us": %.1f, "latency_max_us": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d}\n',
    summary.duration, summary.requests, summary.bytes, errors.connect, errors.read, errors.write, errors.status,
    errors.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99)))
end
