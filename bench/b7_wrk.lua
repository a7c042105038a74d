-- B7: drive a fixed list of requests, each exactly once, with one connection per wrk thread.
--
-- Usage: wrk -t T -c T -d <bound> -s b7_wrk.lua http://127.0.0.1:PORT -- <dir> <mode> <deadport>
--   <dir>/thread-<i>.req  requests of thread i (1-based), one per line:
--                         METHOD \t PATH \t header lines joined by "\1" \t body
--   <mode>                web | api | hello | pi: how an answer is classified
--   <deadport>            a closed 127.0.0.1 port (see below)
--
-- A thread that has had all its answers stops itself. The servers measured are gunicorn sync
-- workers, which close the connection after every answer; wrk then reconnects at once, and a
-- connection that is opened but never used would hold a sync worker (it blocks reading it)
-- while the other threads still have work. So before stopping, the thread points its address
-- at a closed loopback port: its last reconnect is refused by the kernel instead of queueing
-- at the server. It then writes <dir>/done-<i> (its first-request and last-answer times on
-- CLOCK_MONOTONIC); wrk sleeps for the whole -d bound, so the driver sends SIGINT once every
-- thread is done. The done() hook prints one JSON line, prefixed "B7JSON ".

local ffi = require("ffi")
ffi.cdef [[
   typedef struct { long tv_sec; long tv_nsec; } b7_timespec;
   int clock_gettime(int clk_id, b7_timespec *tp);
]]
local ts = ffi.new("b7_timespec")

-- CLOCK_MONOTONIC (1), the clock of Python's time.monotonic(): comparable across threads.
local function monotonic()
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}
local counter = 1

function setup(thread)
   thread:set("id", counter)
   table.insert(threads, thread)
   counter = counter + 1
end

local function split(s, sep)
   local out = {}
   local start = 1
   while true do
      local i = string.find(s, sep, start, true)
      if not i then
         table.insert(out, string.sub(s, start))
         return out
      end
      table.insert(out, string.sub(s, start, i - 1))
      start = i + #sep
   end
end

function init(args)
   dir, mode, deadport = args[1], args[2], args[3]
   reqs = {}
   local f = assert(io.open(dir .. "/thread-" .. id .. ".req", "r"))
   for line in f:lines() do
      local parts = split(line, "\t")
      local headers = {}
      if parts[3] ~= "" then
         for _, h in ipairs(split(parts[3], "\1")) do
            local k, v = string.match(h, "^([^:]+):%s*(.*)$")
            headers[k] = v
         end
      end
      local body = parts[4]
      if body == "" then body = nil end
      table.insert(reqs, wrk.format(parts[1], parts[2], headers, body))
   end
   f:close()
   total = #reqs
   sent, answered = 0, 0
   accepted, refused, other, extra, overrun = 0, 0, 0, 0, 0
   started, finished = 0, 0
   statuses = ""
   -- Resolved now and kept in a global, so the address outlives the thread's use of it.
   dead = wrk.lookup("127.0.0.1", deadport)[1]
end

-- The next request is always the one after the answered ones (one connection, no
-- pipelining). Not a counter of calls: wrk calls request() once more on its first thread to
-- check the script before any thread runs (script_verify_request), which must not use one up.
function request()
   sent = sent + 1
   if answered == 0 then started = monotonic() end  -- the last call before the first answer
   if answered >= total then
      -- Only on the refused connection to the dead port, after the last answer: it never
      -- reaches a server. An answer beyond ``total`` would (counted as ``extra``).
      overrun = overrun + 1
      return reqs[total]
   end
   return reqs[answered + 1]
end

local function classify(status, headers, body)
   if mode == "web" then
      local location = headers["Location"] or headers["location"] or ""
      if status == 302 and not string.find(location, "/auth/", 1, true) then return "accepted" end
      -- qpki.auth.errors INVALID_CODE, or CODE_JUST_USED (the replay guard's own message).
      if status == 200 and (string.find(body, "Invalid verification code", 1, true)
                            or string.find(body, "That code was just used", 1, true)) then
         return "refused"
      end
   elseif mode == "api" then
      if status == 200 and string.find(body, '"result":"accept"', 1, true) then return "accepted" end
      if status == 200 and string.find(body, '"result":"reject"', 1, true) then return "refused" end
   elseif mode == "hello" then
      if status == 200 and body == "ok" then return "accepted" end
   elseif mode == "pi" then
      local compact = string.gsub(body, "%s", "")
      if status == 200 and string.find(compact, '"value":true', 1, true) then return "accepted" end
      if status == 200 and string.find(compact, '"value":false', 1, true) then return "refused" end
   end
   return "other"
end

function response(status, headers, body)
   answered = answered + 1
   if answered > total then
      extra = extra + 1
      return
   end
   local verdict = classify(status, headers, body)
   if verdict == "accepted" then
      accepted = accepted + 1
   elseif verdict == "refused" then
      refused = refused + 1
   else
      other = other + 1
      if #statuses < 200 then statuses = statuses .. status .. " " end
   end
   if answered == total then
      finished = monotonic()
      wrk.thread.addr = dead
      wrk.thread:stop()
      -- Tells the driver this thread is done (wrk itself sleeps for the whole -d bound).
      local f = assert(io.open(dir .. "/done-" .. id, "w"))
      f:write(string.format("%.6f %.6f\n", started, finished))
      f:close()
   end
end

function done(summary, latency, requests)
   local acc, ref, oth, ext, ans, tot, ovr = 0, 0, 0, 0, 0, 0, 0
   local t0, t1 = nil, 0
   local sts = ""
   for _, t in ipairs(threads) do
      acc = acc + t:get("accepted")
      ref = ref + t:get("refused")
      oth = oth + t:get("other")
      ext = ext + t:get("extra")
      ans = ans + t:get("answered")
      tot = tot + t:get("total")
      ovr = ovr + t:get("overrun")
      local st, fi = t:get("started"), t:get("finished")
      if st > 0 and (t0 == nil or st < t0) then t0 = st end
      if fi > t1 then t1 = fi end
      sts = sts .. t:get("statuses")
   end
   local e = summary.errors
   io.write(string.format(
      'B7JSON {"started":%.6f,"finished":%.6f,"overrun":%d,' ..
      '"duration_us":%d,"requests":%d,"total":%d,"answered":%d,"accepted":%d,' ..
      '"refused":%d,"other":%d,"extra":%d,"statuses":"%s","errors":{"connect":%d,' ..
      '"read":%d,"write":%d,"status":%d,"timeout":%d},"latency_us":{"min":%d,"mean":%.1f,' ..
      '"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
      t0 or 0, t1, ovr, summary.duration, summary.requests, tot, ans, acc, ref, oth, ext, sts,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
end
