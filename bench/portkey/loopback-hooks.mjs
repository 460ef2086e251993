// Module resolve hook (node:module register): the gateway bundle's import of @hono/node-server
// goes to hono-loopback.mjs; every other import, that module's own included, resolves as usual.
const GATEWAY = "/node_modules/@portkey-ai/gateway/build/start-server.js";

export async function resolve(specifier, context, nextResolve) {
  if (specifier === "@hono/node-server" && context.parentURL?.endsWith(GATEWAY)) {
    return { url: new URL("./hono-loopback.mjs", import.meta.url).href, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}
