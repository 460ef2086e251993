// Portkey's AI gateway (@portkey-ai/gateway, package.json here) on 127.0.0.1 only, for `make bench`.
//
//     PORTKEY_PORT=0 node bench/portkey/serve.mjs      prints "PORT <n>" when it listens
//
// The package ships one bundled script (build/start-server.js) that builds its Hono app and
// hands the app's fetch handler to @hono/node-server's serve() with no hostname, which
// listens on every interface, at --port (8787 by default). A resolve hook
// (loopback-hooks.mjs) gives that one import hono-loopback.mjs instead: the same module,
// whose serve() binds the same app to 127.0.0.1 at PORTKEY_PORT (0: a free port). Nothing
// else of the gateway changes; --headless leaves out its browser UI and log stream, as a
// deployment would.
//
// package.json overrides @hono/node-server to 1.13.5, the version the gateway's own
// lockfile resolves: its dependency range (^1.3.3) lets npm pick the newest (1.19.19 here;
// the report says any after 1.14.2), whose fetch responses the gateway cannot add its
// headers to, so that every stream through it fails with "TypeError: immutable"
// (Portkey-AI/gateway#1389).
import { register } from "node:module";

register("./loopback-hooks.mjs", import.meta.url);
process.argv.push("--headless");
await import("@portkey-ai/gateway/build/start-server.js");
