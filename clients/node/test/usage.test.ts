// getUsage() against a REAL daemon with caller keys (per-process state: no Redis here; the
// shared-state behaviour is tested in tests/test_state_*.py): a key sees its own spend and
// counters, an admin key sees every key, another key's usage is PERMISSION_DENIED.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, test } from "node:test";

import { BrokerClient, BrokerError } from "../src";
import { brokerConfig, Daemon, FakeUpstream, stopAll, waitFor } from "./harness";

const UPSTREAM_KEY = "sk-test-node-usage-51c0e7a9d2b4";
const TEAM = "mb_test-node-team-3e8a1f0c6b2d4957";
const ADMIN = "mb_test-node-admin-9b7d2c4e1a0f3856";

const sha256 = (s: string): string => createHash("sha256").update(s).digest("hex");

let fake: FakeUpstream | undefined;
let daemon: Daemon | undefined;
let team: BrokerClient;
let admin: BrokerClient;

before(async () => {
  fake = await FakeUpstream.start(UPSTREAM_KEY);
  const keys = [
    "auth:",
    "  keys:",
    "    - name: team-a",
    `      sha256: ${sha256(TEAM)}`,
    "      budget_usd_per_day: 5",
    "    - name: ops",
    `      sha256: ${sha256(ADMIN)}`,
    "      admin: true",
    "",
  ].join("\n");
  daemon = await Daemon.start(brokerConfig(fake.url, UPSTREAM_KEY) + keys);
  team = new BrokerClient(daemon.target, { timeoutMs: 10_000, apiKey: TEAM });
  admin = new BrokerClient(daemon.target, { timeoutMs: 10_000, apiKey: ADMIN });
  await waitFor("readiness SERVING", 15_000, async () =>
    (await team.checkHealth("modelbroker.v1.ModelBroker").catch(() => undefined)) === "SERVING" ? true : undefined,
  );
});

after(async () => {
  team?.close();
  admin?.close();
  await stopAll(daemon, fake);
});

test("a key sees its own spend, budget left and counters", async () => {
  await fake!.command(`reply ${JSON.stringify({ text_chunks: ["hi"], input_tokens: 1000, output_tokens: 500 })}`);
  const answer = await team.complete("openai/gpt-4o-mini", "hello");
  const cost = answer.cost.totalMicroUsd; // 1000 x $0.15/M + 500 x $0.60/M = 450 micro-USD
  assert.equal(cost, 450);
  const usage = await team.getUsage();
  assert.equal(usage.shared, false);
  assert.deepEqual(
    usage.keys.map((k) => k.name),
    ["team-a"],
  );
  const day = usage.keys[0].day!;
  assert.equal(day.spendMicroUsd, 450);
  assert.equal(day.budgetMicroUsd, 5_000_000);
  assert.equal(day.budgetLeftMicroUsd, 5_000_000 - 450);
  assert.equal(day.requests, 1);
  assert.equal(day.inputTokens, 1000);
  assert.equal(day.outputTokens, 500);
  assert.ok(day.resetTime! > day.startTime!);
});

test("an admin key sees every key; another key's usage is refused", async () => {
  const all = await admin.getUsage();
  assert.deepEqual(
    all.keys.map((k) => k.name),
    ["team-a", "ops"],
  );
  assert.equal(all.keys[1].day!.budgetMicroUsd, undefined, "ops has no budget");
  await assert.rejects(team.getUsage(["ops"]), (err: unknown) => {
    assert.ok(err instanceof BrokerError);
    assert.equal(err.reason, "USAGE_NOT_PERMITTED");
    return true;
  });
});
