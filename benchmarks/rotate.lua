-- wrk -s benchmarks/rotate.lua http://127.0.0.1:PORT -- PATHS_FILE
-- Each connection's thread walks the paths in PATHS_FILE (one per line) round-robin, every thread from its
-- own offset, and prints one machine-readable summary line that run.py parses.

local paths = {}
local counter = 1
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      paths[#paths + 1] = line
    end
  end
  counter = ((thread_id or 1) * 97) % #paths + 1
end

function request()
  local path = paths[counter]
  counter = counter % #paths + 1
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, "connect_errors": %.0f, ' ..
    '"read_errors": %.0f, "write_errors": %.0f, "status_errors": %.0f, "timeouts": %.0f, ' ..
    '"p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f, "max_us": %.0f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
