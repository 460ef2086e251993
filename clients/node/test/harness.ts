// Real processes for the Node tests: the Python fake upstream (tests/fakes/serve_fake.py)
// and the real daemon (`model-broker serve`), both on 127.0.0.1 with OS-chosen ports.
// Every child is killed by stopAll() (call it in `after`) and, as a last resort, on exit.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

// dist/test/harness.js -> clients/node -> repo root
export const PACKAGE_DIR = resolve(__dirname, "..", "..");
export const REPO = resolve(PACKAGE_DIR, "..", "..");
const VENV_BIN = process.env.MODEL_BROKER_VENV_BIN ?? join(REPO, ".venv", "bin");

const children = new Set<ChildProcess>();
process.on("exit", () => {
  for (const c of children) {
    c.kill("SIGKILL");
  }
});

/** Resolve with the first value `next` yields within `ms`, else reject naming `what`. */
export async function waitFor<T>(what: string, ms: number, next: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = await next();
    if (v !== undefined) {
      return v;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}`);
}

function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

async function kill(child: ChildProcess, graceMs = 3_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), graceMs);
  await exited;
  clearTimeout(timer);
}

/** tests/fakes/serve_fake.py: FakeOpenAI in its own process, driven by one-line commands. */
export class FakeUpstream {
  private readonly pending: ((line: string) => void)[] = [];

  private constructor(
    readonly child: ChildProcess,
    readonly url: string,
    lines: AsyncIterableIterator<string>,
  ) {
    void (async () => {
      for await (const line of lines) {
        this.pending.shift()?.(line);
      }
    })();
  }

  static async start(apiKey: string, maxSeconds = 120): Promise<FakeUpstream> {
    const script = join(REPO, "tests", "fakes", "serve_fake.py");
    const child = track(
      spawn(join(VENV_BIN, "python"), [script, "--api-key", apiKey, "--max-seconds", String(maxSeconds)], {
        cwd: REPO,
        stdio: ["pipe", "pipe", "inherit"],
      }),
    );
    const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
    const first = await Promise.race([
      lines.next(),
      new Promise<never>((_, reject) => child.once("exit", (code) => reject(new Error(`fake upstream exited (${code})`)))),
    ]);
    if (first.done) {
      throw new Error("fake upstream closed stdout before printing its URL");
    }
    const { url } = JSON.parse(first.value) as { url: string };
    return new FakeUpstream(child, url, lines);
  }

  /** Send one command ("stop", "start", "reply {...}", "fault {...}", "stats"); resolves its answer. */
  async command(line: string): Promise<Record<string, unknown>> {
    const answer = new Promise<string>((r) => this.pending.push(r));
    this.child.stdin!.write(`${line}\n`);
    const parsed = JSON.parse(await answer) as Record<string, unknown>;
    if ("error" in parsed) {
      throw new Error(`fake upstream rejected ${JSON.stringify(line)}: ${String(parsed.error)}`);
    }
    return parsed;
  }

  async stop(): Promise<void> {
    this.child.stdin!.end(); // EOF: the fake exits by itself
    await kill(this.child);
  }
}

/** `model-broker serve` on 127.0.0.1:0; the port comes from its `serving` log line. */
export class Daemon {
  private constructor(
    readonly child: ChildProcess,
    readonly target: string,
    private readonly dir: string,
    /** Its JSON log lines so far (stderr), for assertions and for failure messages. */
    readonly logs: string[],
  ) {}

  static async start(configYaml: string): Promise<Daemon> {
    const dir = mkdtempSync(join(tmpdir(), "mb-node-test-"));
    const config = join(dir, "broker.yaml");
    writeFileSync(config, configYaml);
    const child = track(
      spawn(join(VENV_BIN, "model-broker"), ["serve", "--config", config, "--listen", "127.0.0.1:0"], {
        cwd: REPO,
        stdio: ["ignore", "inherit", "pipe"],
        env: { ...process.env, MODEL_BROKER_LOG_LEVEL: "info" },
      }),
    );
    const logs: string[] = [];
    const listen = new Promise<string>((resolveListen, reject) => {
      child.once("exit", (code) => reject(new Error(`daemon exited (${code}):\n${logs.join("\n")}`)));
      createInterface({ input: child.stderr! }).on("line", (line) => {
        logs.push(line);
        try {
          const rec = JSON.parse(line) as { event?: string; listen?: string };
          if (rec.event === "serving" && rec.listen) {
            resolveListen(rec.listen);
          }
        } catch {
          // not a JSON log line (e.g. a warning printed before logging is set up)
        }
      });
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`daemon did not log "serving" in 30 s:\n${logs.join("\n")}`)), 30_000);
    });
    try {
      return new Daemon(child, await Promise.race([listen, timeout]), dir, logs);
    } catch (err) {
      await kill(child);
      rmSync(dir, { recursive: true, force: true });
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  async stop(): Promise<void> {
    await kill(this.child);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The daemon config every Node test uses: one OpenAI-protocol provider at the fake, priced. */
export function brokerConfig(upstreamUrl: string, apiKey: string): string {
  return [
    "providers:",
    "  - name: openai",
    "    type: openai",
    `    base_url: ${upstreamUrl}`,
    `    api_key: ${apiKey}`,
    "    priority: 10",
    "    read_timeout_seconds: 10",
    "aliases:",
    "  fast: openai/gpt-4o-mini",
    "models:",
    // Prices so cost is known: $0.15 / $0.60 per million tokens in / out.
    "  - id: openai/gpt-4o-mini",
    "    input_usd_per_mtok: 0.15",
    "    output_usd_per_mtok: 0.6",
    "health:",
    "  interval_seconds: 0.2",
    "  timeout_seconds: 1.0",
    "server:",
    "  shutdown_grace_seconds: 0",
    "",
  ].join("\n");
}

/** Stop every child this process started, daemons first (they hold connections to fakes). */
export async function stopAll(...procs: (Daemon | FakeUpstream | undefined)[]): Promise<void> {
  for (const p of procs) {
    await p?.stop();
  }
}
