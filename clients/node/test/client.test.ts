// The Node client against a REAL daemon (`model-broker serve`) in front of a fake OpenAI
// upstream (tests/fakes/serve_fake.py), both separate processes on 127.0.0.1.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import { type ServiceError, status as Status } from "@grpc/grpc-js";

import {
  BrokerClient,
  BrokerError,
  CancelledError,
  DeadlineExceededError,
  InvalidRequestError,
  ModelNotFoundError,
  ProviderHealth,
  RateLimitedError,
  type StreamEvent,
  StreamInterruptedError,
  Turn,
  UnavailableError,
} from "../src";
import { brokerConfig, Daemon, FakeUpstream, PACKAGE_DIR, stopAll, waitFor } from "./harness";

const KEY = "sk-test-node-8d2f6a41c97e03b5";

let fake: FakeUpstream | undefined;
let daemon: Daemon | undefined;
let client: BrokerClient;

async function collect(events: AsyncIterable<StreamEvent>): Promise<StreamEvent[]> {
  const out: StreamEvent[] = [];
  for await (const ev of events) {
    out.push(ev);
  }
  return out;
}

/** Wait until the fake has seen `n` client disconnects in total (the daemon closed the upstream). */
async function disconnectsReach(n: number): Promise<number> {
  return waitFor(`${n} upstream disconnect(s)`, 5_000, async () => {
    const seen = (await fake!.command("stats")).disconnects as number;
    return seen >= n ? seen : undefined;
  });
}

before(async () => {
  fake = await FakeUpstream.start(KEY);
  daemon = await Daemon.start(brokerConfig(fake.url, KEY));
  client = new BrokerClient(daemon.target, { timeoutMs: 10_000 });
  await waitFor("readiness SERVING", 15_000, async () =>
    (await client.checkHealth("modelbroker.v1.ModelBroker").catch(() => undefined)) === "SERVING" ? true : undefined,
  );
});

after(async () => {
  client?.close();
  await stopAll(daemon, fake);
});

describe("stream()", () => {
  test("yields start, text deltas, then end with usage and cost", async () => {
    await fake!.command(
      'reply {"text_chunks": ["The ", "answer ", "is ", "42."], "input_tokens": 120000, "output_tokens": 50000}',
    );
    const events = await collect(client.stream("openai/gpt-4o-mini", "What is the answer?"));

    const start = events[0];
    assert.ok(start?.type === "start");
    assert.equal(start.provider, "openai");
    assert.equal(start.model, "gpt-4o-mini");
    assert.ok(start.requestId.length >= 16, `request id ${start.requestId}`);

    const deltas = events.filter((e) => e.type === "textDelta");
    assert.equal(deltas.length, 4, "text arrives as several deltas, not one blob");
    assert.equal(deltas.map((d) => d.text).join(""), "The answer is 42.");

    const end = events.at(-1);
    assert.ok(end?.type === "end");
    assert.equal(events.length, 6);
    assert.equal(end.finishReason, "stop");
    assert.equal(end.usage.inputTokens, 120_000);
    assert.equal(end.usage.outputTokens, 50_000);
    // 120k tokens at $0.15/M = 18,000 micro-USD; 50k at $0.60/M = 30,000 micro-USD.
    assert.deepEqual(end.cost, { known: true, inputMicroUsd: 18_000, outputMicroUsd: 30_000, totalMicroUsd: 48_000 });
  });

  test("tool calls arrive as indexed deltas: id and name first, then argument fragments", async () => {
    await fake!.command(
      'reply {"text_chunks": [], "tool_calls": [{"id": "call_w1", "name": "get_weather", ' +
        '"argument_chunks": ["{\\"city\\":", " \\"Paris\\"}"]}], "finish": "tool_calls", ' +
        '"input_tokens": 40, "output_tokens": 9}',
    );
    const weather = {
      name: "get_weather",
      description: "Weather by city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
      strict: false,
      cacheControl: undefined,
    };
    const events = await collect(client.stream("fast", [{ role: "user", content: "Weather in Paris?" }], { tools: [weather] }));
    const calls = events.filter((e) => e.type === "toolCallDelta");
    assert.ok(calls.length >= 2, `expected several tool-call deltas, got ${calls.length}`);
    assert.equal(calls[0]?.id, "call_w1");
    assert.equal(calls[0]?.name, "get_weather");
    assert.ok(calls.every((c) => c.index === 0));
    assert.deepEqual(JSON.parse(calls.map((c) => c.argumentsDelta).join("")), { city: "Paris" });
    const end = events.at(-1);
    assert.equal(end?.type === "end" && end.finishReason, "tool_calls");
  });

  test("a failure after output is StreamInterruptedError (an UnavailableError), text kept", async () => {
    await fake!.command('reply {"text_chunks": ["one ", "two ", "three"]}');
    await fake!.command('fault {"kind": "disconnect_mid_stream", "after_chunks": 2}');
    const seen: string[] = [];
    await assert.rejects(
      async () => {
        for await (const ev of client.stream("openai/gpt-4o-mini", "count")) {
          if (ev.type === "textDelta") {
            seen.push(ev.text);
          }
        }
      },
      (err: unknown) => {
        assert.ok(err instanceof StreamInterruptedError, `got ${String(err)}`);
        assert.ok(err instanceof UnavailableError);
        assert.equal(err.code, Status.UNAVAILABLE);
        assert.equal(err.reason, "STREAM_INTERRUPTED");
        assert.equal(err.metadata.provider, "openai");
        assert.match(err.details, /openai\/gpt-4o-mini/);
        // The grpc-message trailer itself arrived (Node's HTTP/2 drops one with stray whitespace).
        assert.equal((err.cause as ServiceError).details, err.details);
        return true;
      },
    );
    assert.deepEqual(seen, ["one ", "two "], "what arrived before the failure is all there is");
  });
});

describe("reasoning", () => {
  test("reasoning deltas come apart from the text; Turn and complete() keep them for the next turn", async () => {
    await fake!.command("reasoning [\"Think \", \"first.\"]");
    await fake!.command('reply {"text_chunks": ["Done", "."], "input_tokens": 10, "output_tokens": 4}');
    try {
      const events = await collect(client.stream("openai/gpt-4o-mini", "Think, then answer."));
      const kinds = events.map((e) => e.type);
      assert.deepEqual(kinds, ["start", "reasoningDelta", "reasoningDelta", "textDelta", "textDelta", "end"]);
      assert.equal(events[0]?.type === "start" ? events[0].providerType : "", "openai");
      const turn = new Turn();
      events.forEach((e) => turn.add(e));
      const msg = turn.message();
      assert.deepEqual(
        msg.content.map((p) => p.part),
        [
          { $case: "reasoning", value: { text: "Think first.", signature: "", redactedData: "", providerType: "openai" } },
          { $case: "text", value: "Done." },
        ],
      );
      const answer = await client.complete("openai/gpt-4o-mini", "Think, then answer.");
      assert.equal(answer.text, "Done.");
      assert.equal(answer.reasoning, "Think first.");
      assert.equal(answer.message.content[0]?.part?.$case, "reasoning");
    } finally {
      await fake!.command("reasoning []");
    }
  });
});

describe("complete()", () => {
  test("returns the whole answer with usage and cost", async () => {
    await fake!.command('reply {"text_chunks": ["Hel", "lo"], "input_tokens": 10, "output_tokens": 2}');
    const answer = await client.complete("fast", [
      { role: "system", content: "Be brief." },
      { role: "user", content: "hi" },
    ]);
    assert.equal(answer.text, "Hello");
    assert.equal(answer.provider, "openai");
    assert.equal(answer.model, "gpt-4o-mini");
    assert.equal(answer.finishReason, "stop");
    assert.deepEqual([answer.usage.inputTokens, answer.usage.outputTokens], [10, 2]);
    assert.equal(answer.cost.known, true);
    assert.equal(answer.cost.totalMicroUsd, 3); // 1.5 + 1.2 micro-USD, rounded once
  });
});

describe("models and providers", () => {
  test("listProviders and listModels describe the configured provider", async () => {
    const [openai, ...others] = await client.listProviders();
    assert.equal(others.length, 0);
    assert.equal(openai?.name, "openai");
    assert.equal(openai?.type, "openai");
    assert.equal(openai?.health, ProviderHealth.PROVIDER_HEALTH_SERVING);
    assert.ok(!JSON.stringify(openai).includes(KEY), "the provider key is never listed");
    const ids = (await client.listModels("openai")).map((m) => m.id);
    assert.ok(ids.includes("openai/gpt-4o-mini"), ids.join(","));
    assert.equal((await client.getModel("fast"))?.id, "openai/gpt-4o-mini");
  });
});

describe("embed()", () => {
  test("returns one vector per input in order, with usage and cost", async () => {
    const out = await client.embed("openai/text-embedding-3-small", ["a cat sat", "dogs"], { dimensions: 8 });
    assert.equal(out.vectors.length, 2);
    assert.equal(out.dimensions, 8);
    assert.ok(out.vectors.every((v) => v.length === 8));
    assert.notDeepEqual(out.vectors[0], out.vectors[1]);
    assert.equal(out.provider, "openai");
    assert.equal(out.model, "text-embedding-3-small");
    assert.equal(Number(out.usage?.inputTokens), 4);
    assert.ok(out.requestId);
  });

  test("a chat model is refused: FAILED_PRECONDITION CAPABILITY_MISSING", async () => {
    await assert.rejects(client.embed("openai/gpt-4o-mini", "x"), (err: unknown) => {
      assert.ok(err instanceof BrokerError);
      assert.equal(err.code, Status.FAILED_PRECONDITION);
      assert.equal(err.reason, "CAPABILITY_MISSING");
      return true;
    });
  });
});

describe("errors", () => {
  test("an unknown model is ModelNotFoundError: NOT_FOUND with reason MODEL_NOT_FOUND", async () => {
    await assert.rejects(collect(client.stream("openai-nope/never-heard-of-it", "hi")), (err: unknown) => {
      assert.ok(err instanceof ModelNotFoundError, `got ${String(err)}`);
      assert.ok(err instanceof BrokerError);
      assert.equal(err.code, Status.NOT_FOUND);
      assert.equal(err.codeName, "NOT_FOUND");
      assert.equal(err.reason, "MODEL_NOT_FOUND");
      assert.equal(err.domain, "modelbroker");
      assert.match(err.message, /^NOT_FOUND: .*never-heard-of-it.* \[MODEL_NOT_FOUND\]$/);
      return true;
    });
  });

  test("a malformed request is InvalidRequestError naming the field", async () => {
    await assert.rejects(client.complete("fast", []), (err: unknown) => {
      assert.ok(err instanceof InvalidRequestError, `got ${String(err)}`);
      assert.equal(err.code, Status.INVALID_ARGUMENT);
      assert.equal(err.reason, "INVALID_REQUEST");
      assert.ok(
        err.fieldViolations.some((v) => v.field === "messages" && v.description.length > 0),
        JSON.stringify(err.fieldViolations),
      );
      return true;
    });
  });

  test("an upstream 429 is RateLimitedError with RetryInfo's delay", async () => {
    // Longer than the daemon waits out itself (it would retry a short one): the caller gets it.
    await fake!.command('fault {"kind": "status", "status": 429, "headers": {"retry-after": "30"}}');
    await assert.rejects(client.complete("openai/gpt-4o-mini", "hi"), (err: unknown) => {
      assert.ok(err instanceof RateLimitedError, `got ${String(err)}`);
      assert.equal(err.code, Status.RESOURCE_EXHAUSTED);
      assert.equal(err.reason, "UPSTREAM_RATE_LIMITED");
      assert.equal(err.retryDelay, 30);
      assert.equal(err.metadata.provider, "openai");
      assert.doesNotMatch(err.message, new RegExp(KEY), "the provider key never reaches a caller");
      return true;
    });
  });
});

describe("deadlines and cancellation", () => {
  test("aborting the signal mid-stream ends the call and closes the upstream request", async () => {
    const before = (await fake!.command("stats")).disconnects as number;
    // 40 chunks 0.25 s apart: 10 s of generation that the abort must cut short.
    await fake!.command(`reply ${JSON.stringify({ text_chunks: Array(40).fill("tok "), chunk_delay: 0.25 })}`);
    const controller = new AbortController();
    const seen: StreamEvent[] = [];
    const began = Date.now();
    await assert.rejects(
      async () => {
        for await (const ev of client.stream("openai/gpt-4o-mini", "go on", { signal: controller.signal })) {
          seen.push(ev);
          if (ev.type === "textDelta") {
            controller.abort(new Error("user pressed stop"));
          }
        }
      },
      (err: unknown) => {
        assert.ok(err instanceof CancelledError, `got ${String(err)}`);
        assert.equal(err.code, Status.CANCELLED);
        assert.equal((err.cause as Error).message, "user pressed stop");
        return true;
      },
    );
    assert.ok(Date.now() - began < 8_000, "the abort must not wait for the whole generation");
    assert.equal(seen.filter((e) => e.type === "textDelta").length, 1, "nothing is yielded after the abort");
    await disconnectsReach(before + 1);
  });

  test("an already-aborted signal fails before any call is made", async () => {
    const stats = await fake!.command("stats");
    const signal = AbortSignal.abort();
    await assert.rejects(client.complete("fast", "hi", { signal }), CancelledError);
    await assert.rejects(collect(client.stream("fast", "hi", { signal })), CancelledError);
    assert.equal((await fake!.command("stats")).chat_requests, stats.chat_requests, "no request went upstream");
  });

  test("aborting a unary complete() cancels it", async () => {
    await fake!.command(`reply ${JSON.stringify({ text_chunks: Array(40).fill("tok "), chunk_delay: 0.25 })}`);
    const before = (await fake!.command("stats")).disconnects as number;
    const signal = AbortSignal.timeout(500);
    await assert.rejects(client.complete("fast", "hi", { signal }), CancelledError);
    await disconnectsReach(before + 1);
  });

  test("timeoutMs is a gRPC deadline: DeadlineExceededError, upstream closed", async () => {
    await fake!.command(`reply ${JSON.stringify({ text_chunks: Array(40).fill("tok "), chunk_delay: 0.25 })}`);
    const before = (await fake!.command("stats")).disconnects as number;
    await assert.rejects(collect(client.stream("fast", "hi", { timeoutMs: 600 })), (err: unknown) => {
      assert.ok(err instanceof DeadlineExceededError, `got ${String(err)}`);
      assert.equal(err.code, Status.DEADLINE_EXCEEDED);
      return true;
    });
    await disconnectsReach(before + 1);
  });

  test("breaking out of the loop early cancels the call", async () => {
    await fake!.command(`reply ${JSON.stringify({ text_chunks: Array(40).fill("tok "), chunk_delay: 0.25 })}`);
    const before = (await fake!.command("stats")).disconnects as number;
    for await (const ev of client.stream("fast", "hi")) {
      if (ev.type === "textDelta") {
        break;
      }
    }
    await disconnectsReach(before + 1);
  });
});

describe("examples", () => {
  test("examples/stream.js prints the text to stdout and usage and cost to stderr", async () => {
    await fake!.command('reply {"text_chunks": ["Bon", "jour", " !"], "input_tokens": 14, "output_tokens": 6}');
    const script = join(PACKAGE_DIR, "dist", "examples", "stream.js");
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [script, daemon!.target, "fast", "hi"], {
      timeout: 20_000,
    });
    assert.equal(stdout, "Bonjour !\n");
    assert.match(stderr, /^\[openai\/gpt-4o-mini request [0-9a-f]{16,}\]$/m);
    // 14 in at $0.15/M (2.1) + 6 out at $0.60/M (3.6) = 5.7, rounded once to 6 micro-USD.
    assert.match(stderr, /\[finish stop; tokens in 14, out 6; cost 6 micro-USD \(\$0\.000006\)\]/);
  });
});
