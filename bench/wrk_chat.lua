-- wrk script for bench/proxy_overhead.py: POST an OpenAI chat request and, at the end,
-- print one machine-readable line with the totals and the latency percentiles.
--
-- Configured through the environment (set by proxy_overhead.py):
--   BENCH_BODY     the JSON request body (required)
--   BENCH_API_KEY  sent as "Authorization: Bearer <key>" (default sk-bench)
--
-- The request is static (no request() function), so wrk formats it once per thread and
-- spends no Lua time per request. wrk itself counts answers with status > 399 as
-- errors.status; proxy_overhead.py reports them.

local body = os.getenv("BENCH_BODY")
if body == nil or body == "" then
   io.stderr:write("wrk_chat.lua: BENCH_BODY is not set\n")
   os.exit(2)
end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_API_KEY") or "sk-bench")

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.3f,"stdev":%.3f,"max":%d,' ..
      '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99_9":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
