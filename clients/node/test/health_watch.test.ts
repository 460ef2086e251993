// grpc.health.v1 Watch from a Node client: `provider/openai` (and readiness) flip to
// NOT_SERVING when the upstream process stops listening, and back when it returns on the
// same port. Its own daemon and fake, so taking the upstream down disturbs no other test.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { BrokerClient, type HealthStatus } from "../src";
import { brokerConfig, Daemon, FakeUpstream, stopAll, waitFor } from "./harness";

const KEY = "sk-test-node-watch-71b0e4d2a9";

let fake: FakeUpstream | undefined;
let daemon: Daemon | undefined;
let client: BrokerClient;

/** Watch `service` in the background, recording every status it reports. */
function watch(service: string, signal: AbortSignal): { seen: HealthStatus[]; done: Promise<unknown> } {
  const seen: HealthStatus[] = [];
  const done = (async () => {
    for await (const status of client.watchHealth(service, { signal })) {
      seen.push(status);
    }
  })().catch((err: unknown) => err); // ends with CancelledError when the test aborts it
  return { seen, done };
}

/** Wait until `seen` has `status` at or after index `from`; returns its index. */
function reaches(seen: HealthStatus[], status: HealthStatus, from: number): Promise<number> {
  // Health checks run every 0.2 s with a 1 s timeout: a flip shows within ~1.2 s.
  return waitFor(`${status} after index ${from} (seen ${seen.join(",")})`, 10_000, async () => {
    const i = seen.indexOf(status, from);
    return i >= 0 ? i : undefined;
  });
}

before(async () => {
  fake = await FakeUpstream.start(KEY);
  daemon = await Daemon.start(brokerConfig(fake.url, KEY));
  client = new BrokerClient(daemon.target, { timeoutMs: 10_000 });
});

after(async () => {
  client?.close();
  await stopAll(daemon, fake);
});

test("Watch on provider/<name> sees the upstream go away and come back", async () => {
  const controller = new AbortController();
  const provider = watch("provider/openai", controller.signal);
  const readiness = watch("modelbroker.v1.ModelBroker", controller.signal);
  try {
    const up = await reaches(provider.seen, "SERVING", 0);
    const ready = await reaches(readiness.seen, "SERVING", 0);
    assert.equal(await client.checkHealth("provider/openai"), "SERVING");

    await fake!.command("stop");
    const down = await reaches(provider.seen, "NOT_SERVING", up + 1);
    // One provider behind the daemon: readiness follows it, liveness ("") does not.
    await reaches(readiness.seen, "NOT_SERVING", ready + 1);
    assert.equal(await client.checkHealth("provider/openai"), "NOT_SERVING");
    assert.equal(await client.checkHealth(""), "SERVING", "a provider outage must not fail liveness");

    await fake!.command("start");
    await reaches(provider.seen, "SERVING", down + 1);
    assert.equal(await client.checkHealth("provider/openai"), "SERVING");

    // And the daemon serves through the returned upstream again.
    const answer = await client.complete("openai/gpt-4o-mini", "back?");
    assert.equal(answer.text, "Hello there!");
  } finally {
    controller.abort();
  }
  const ended = await provider.done;
  assert.equal((ended as Error).name, "CancelledError", "aborting the signal ends the watch");
  // Watch sends a message only on change: no repeated statuses in a row.
  assert.ok(
    provider.seen.every((s, i) => i === 0 || s !== provider.seen[i - 1]),
    `statuses: ${provider.seen.join(",")}`,
  );
});

test("Watch on an unknown name reports SERVICE_UNKNOWN and stays open", async () => {
  const controller = new AbortController();
  const w = watch("provider/nope", controller.signal);
  await reaches(w.seen, "SERVICE_UNKNOWN", 0);
  controller.abort();
  assert.equal(((await w.done) as Error).name, "CancelledError");
});
