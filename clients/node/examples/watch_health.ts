// Watch a grpc.health.v1 service name and print every change until Ctrl-C.
//
//   npm run build && node dist/examples/watch_health.js [TARGET] [SERVICE]
//   SERVICE: "" (liveness), modelbroker.v1.ModelBroker (readiness) or provider/<name>
//   (defaults: 127.0.0.1:50051, modelbroker.v1.ModelBroker)
//
// As grpc.health.v1 asks: a watch that ends with UNIMPLEMENTED is not retried; any other
// ending (daemon restarting, network) is retried with capped exponential backoff.
import { status as Status } from "@grpc/grpc-js";

import { BrokerClient, BrokerError, CancelledError } from "../src";

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function main(): Promise<number> {
  const [target = "127.0.0.1:50051", service = "modelbroker.v1.ModelBroker"] = process.argv.slice(2);
  const client = new BrokerClient(target);
  const controller = new AbortController();
  process.once("SIGINT", () => controller.abort());
  let backoffMs = 250;
  try {
    while (!controller.signal.aborted) {
      try {
        // The first status comes at once, then one per change.
        for await (const status of client.watchHealth(service, { signal: controller.signal })) {
          console.log(`${new Date().toISOString()} ${service || '""'} ${status}`);
          backoffMs = 250;
        }
      } catch (err) {
        if (err instanceof CancelledError) {
          return 0;
        }
        if (!(err instanceof BrokerError) || err.code === Status.UNIMPLEMENTED) {
          throw err;
        }
        console.log(`${new Date().toISOString()} ${service || '""'} UNREACHABLE (${err.codeName}); retrying`);
      }
      await sleep(backoffMs);
      backoffMs = Math.min(backoffMs * 2, 5_000);
    }
    return 0;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code));
