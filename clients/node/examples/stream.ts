// Stream a completion from a running daemon and print it as it arrives.
//
//   npm run build && node dist/examples/stream.js [TARGET] [MODEL] [PROMPT...]
//   (defaults: 127.0.0.1:50051, openai/gpt-4o-mini, "Say hello in French")
//
// Text goes to stdout; the model, provider, usage and cost to stderr. Ctrl-C aborts the
// call (and the daemon closes the upstream request at once).
import { BrokerClient, BrokerError, StreamInterruptedError, UnavailableError } from "../src";

async function main(): Promise<number> {
  const [target = "127.0.0.1:50051", model = "openai/gpt-4o-mini", ...words] = process.argv.slice(2);
  const prompt = words.join(" ") || "Say hello in French";
  const client = new BrokerClient(target, { timeoutMs: 60_000 });
  const controller = new AbortController();
  process.once("SIGINT", () => controller.abort());
  try {
    for await (const ev of client.stream(model, prompt, { signal: controller.signal })) {
      switch (ev.type) {
        case "start":
          process.stderr.write(`[${ev.provider}/${ev.model} request ${ev.requestId}]\n`);
          break;
        case "textDelta":
          process.stdout.write(ev.text);
          break;
        case "toolCallDelta":
          process.stdout.write(ev.name ? `\n[tool call ${ev.name}] ${ev.argumentsDelta}` : ev.argumentsDelta);
          break;
        case "end": {
          const { usage, cost } = ev;
          const price = cost.known ? `${cost.totalMicroUsd} micro-USD ($${(cost.totalMicroUsd / 1e6).toFixed(6)})` : "unknown";
          process.stdout.write("\n");
          process.stderr.write(
            `[finish ${ev.finishReason}; tokens in ${usage.inputTokens}, out ${usage.outputTokens}; cost ${price}]\n`,
          );
          break;
        }
      }
    }
    return 0;
  } catch (err) {
    if (err instanceof StreamInterruptedError) {
      // Output already shown is all there is: the broker never splices another model's text.
      process.stderr.write(`\n[interrupted after partial output: ${err.details}]\n`);
    } else if (err instanceof UnavailableError) {
      const wait = err.retryDelay === undefined ? "" : `; retry in ${err.retryDelay}s`;
      process.stderr.write(`[unavailable (${err.reason}): ${err.details}${wait}]\n`);
    } else if (err instanceof BrokerError) {
      process.stderr.write(`[${err.codeName} ${err.reason}: ${err.details}]\n`);
      for (const v of err.fieldViolations) {
        process.stderr.write(`  ${v.field}: ${v.description}\n`);
      }
    } else {
      throw err;
    }
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code));
