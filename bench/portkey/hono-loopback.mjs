// @hono/node-server as the gateway imports it, except serve(): the app it is given is bound to
// 127.0.0.1 at PORTKEY_PORT (0: a free port), whatever port or hostname the gateway asked for.
import { createAdaptorServer } from "@hono/node-server";

export * from "@hono/node-server";

export function serve(options, listeningListener) {
  const server = createAdaptorServer(options);
  const port = Number.parseInt(process.env.PORTKEY_PORT ?? "0", 10);
  server.listen(port, "127.0.0.1", () => {
    const info = server.address();
    console.log(`PORT ${info.port}`);
    listeningListener?.(info);
  });
  return server;
}
