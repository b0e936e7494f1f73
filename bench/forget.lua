-- wrk script for bench_forget.py: POST /forget/<prefix><i> once for every i in [0, total),
-- spread over wrk's threads (thread k takes k, k + threads, ...); a thread stops once its share
-- is answered. Each 202's request_id goes to <out>/accepted-<k>.txt for the ledger check.
-- wrk itself runs to --duration whatever its threads do, so a finished thread leaves
-- <out>/done-<k> and bench_forget.py interrupts wrk (SIGINT) once every thread has.
--
-- args (after --): prefix total threads out_dir api_key
-- A connection that finds its thread's share used up posts an unknown sample instead (404):
-- those few tail requests are counted apart and are not errors. A share whose last answers never
-- come (a reset connection) is given up 15 s into the tail; bench_forget.py counts them as errors.

local threads = {}

function setup(thread)
  thread:set("index", #threads)
  table.insert(threads, thread)
end

function init(args)
  prefix, total, stride = args[1], tonumber(args[2]), tonumber(args[3])
  share = math.floor((total - index + stride - 1) / stride)
  next_id, sent = index, 0
  accepted, repeated, failed, tail = 0, 0, 0, 0
  out = args[4]
  ids = assert(io.open(out .. "/accepted-" .. index .. ".txt", "w"))
  wrk.method = "POST"
  wrk.headers["X-API-Key"] = args[5]
end

function request()
  if index == 0 and not inspected then
    inspected = true -- wrk calls request() once on thread 0 to inspect it; it is never sent
    return wrk.format(nil, "/forget/" .. prefix .. "tail")
  end
  if sent >= share then
    tail_since = tail_since or os.time()
    return wrk.format(nil, "/forget/" .. prefix .. "tail")
  end
  local path = string.format("/forget/%s%07d", prefix, next_id)
  next_id, sent = next_id + stride, sent + 1
  return wrk.format(nil, path)
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
    ids:write(body:match('"request_id":"([^"]+)"'), "\n")
  elseif status == 200 then
    repeated = repeated + 1
  elseif status == 404 then
    tail = tail + 1
  else
    failed = failed + 1
  end
  local given_up = tail_since and os.time() - tail_since > 15
  if ids and (accepted + repeated + failed >= share or given_up) then
    ids:close()
    ids = nil
    assert(io.open(out .. "/done-" .. index, "w")):close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local totals = { accepted = 0, repeated = 0, failed = 0, tail = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + thread:get(name)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "accepted": %d, "repeated": %d, '
      .. '"failed": %d, "tail": %d, "socket_errors": %d, "p50_us": %d, "p95_us": %d, '
      .. '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, totals.accepted, totals.repeated, totals.failed,
    totals.tail, e.connect + e.read + e.write + e.timeout, latency:percentile(50),
    latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
