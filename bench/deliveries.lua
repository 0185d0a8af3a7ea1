-- wrk script: sends pre-signed deliveries, each body once (unique eventIds).
--   wrk -s bench/deliveries.lua URL -- FILE THREADS
-- FILE holds one delivery per line: signature, timestamp and body, tab-separated (the
-- bodies are JSON without raw tabs). Thread i of THREADS sends lines i, i + THREADS, ...
-- done() prints one JSON line: what was sent, what failed, and the latency percentiles.

local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local file, threads = args[1], tonumber(args[2])
  requests, index, line_no = {}, 0, 0
  for line in io.lines(file) do
    if line_no % threads == id then
      local signature, timestamp, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", nil, {
        ["content-type"] = "application/json",
        ["cmr-x-signature"] = signature,
        ["cmr-x-timestamp"] = timestamp,
      }, body)
    end
    line_no = line_no + 1
  end
end

function request()
  -- past the last body it starts again: the run sees more requests than lines, and fails
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
