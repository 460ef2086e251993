// A thin client over the generated stubs: typed stream events, a whole answer, typed errors,
// deadlines and AbortSignal cancellation. Everything else is the generated code, so the
// wire types stay exactly what proto/ says.
import {
  credentials as grpcCredentials,
  Metadata,
  status as Status,
  type ChannelCredentials,
  type ChannelOptions,
} from "@grpc/grpc-js";
import type { CallOptions as GrpcCallOptions } from "@grpc/grpc-js";

import {
  HealthCheckResponse_ServingStatus as ServingStatus,
  healthCheckResponse_ServingStatusToJSON,
  HealthClient,
} from "../gen/grpc/health/v1/health";
import {
  CompleteRequest,
  type CompleteResponse,
  type Cost,
  EmbedRequest,
  type EmbedResponse,
  FinishReason,
  type GetUsageResponse,
  type GenerationParams,
  ListModelsRequest,
  type ListModelsResponse,
  type ListProvidersResponse,
  type Message,
  ModelBrokerClient,
  type ModelInfo,
  type ProviderInfo,
  type Refusal,
  type RequestMetadata,
  type Requirements,
  Role,
  StreamCompleteRequest,
  type StreamCompleteResponse,
  type Tool,
  type ToolChoice,
  type Usage,
} from "../gen/modelbroker/v1/broker";
import { CancelledError, toBrokerError } from "./errors";

export type FinishReasonName =
  | "stop"
  | "length"
  | "tool_calls"
  | "content_filter"
  | "refusal"
  | "other"
  | "unspecified";

export interface StartEvent {
  type: "start";
  requestId: string;
  model: string;
  provider: string;
  /** The provider's type: set as providerType on reasoning parts sent back in history. */
  providerType: string;
}
/** A piece of the model's reasoning, never part of the answer text. */
export interface ReasoningDeltaEvent {
  type: "reasoningDelta";
  index: number;
  text: string;
  /** Anthropic: the block's signature, on its last delta. */
  signature: string;
  /** Anthropic redacted_thinking: the opaque block, whole. */
  redactedData: string;
}
export interface TextDeltaEvent {
  type: "textDelta";
  text: string;
}
/** The first delta of a call carries id and name; later ones with the same index add argument text. */
export interface ToolCallDeltaEvent {
  type: "toolCallDelta";
  index: number;
  id: string;
  name: string;
  argumentsDelta: string;
}
export interface EndEvent {
  type: "end";
  finishReason: FinishReasonName;
  usage: Usage;
  /** Integer micro-USD; `known: false` means no price is known (not "free"). */
  cost: Cost;
  /** Set when finishReason is "refusal". */
  refusal?: Refusal;
}
export type StreamEvent = StartEvent | TextDeltaEvent | ReasoningDeltaEvent | ToolCallDeltaEvent | EndEvent;

export interface ToolCall {
  id: string;
  name: string;
  /** JSON text as the model produced it: validate before use. */
  arguments: string;
}

/** A whole completion. */
export interface Answer {
  text: string;
  toolCalls: ToolCall[];
  finishReason: FinishReasonName;
  usage: Usage;
  cost: Cost;
  model: string;
  provider: string;
  requestId: string;
  /** The reasoning text, joined (display only: send `message` back in history). */
  reasoning: string;
  refusal?: Refusal;
  /** The assistant turn as the broker answered it, reasoning parts included. */
  message: Message;
}

export type RoleName = "system" | "user" | "assistant" | "tool";
/** A generated Message, or the short form `{ role: "user", content: "Hi" }`. */
export type MessageInput = Message | { role: RoleName; content: string; toolCallId?: string; isError?: boolean };

export interface CallOptions {
  /** Deadline for this call in milliseconds (default: the client's `timeoutMs`). */
  timeoutMs?: number;
  /** Aborting it cancels the RPC at once; the daemon closes the upstream request too. */
  signal?: AbortSignal;
  /** Extra request metadata (e.g. a request id for your own tracing). */
  metadata?: Record<string, string>;
}

export interface CompletionOptions extends CallOptions {
  tools?: Tool[];
  toolChoice?: ToolChoice;
  params?: Partial<GenerationParams>;
  requirements?: Partial<Requirements>;
  /** Models to try in order when the first fails before any output. */
  fallbackModels?: string[];
  /** Who the request is for (the vendor's end-user field) and tags for the log line. */
  metadata_?: Partial<RequestMetadata>;
  /** Vendor parameters per provider type, merged into that type's upstream body. */
  providerOptions?: Record<string, Record<string, unknown>>;
}

export interface EmbedOptions extends CallOptions {
  /** Vector size to ask for (models that can shorten their vectors, e.g. text-embedding-3-*). */
  dimensions?: number;
  /** Models to try in order when the first fails. */
  fallbackModels?: string[];
  /** With model "": select an embedding model with at least this many dimensions. */
  minDimensions?: number;
}

/** One vector per input, in input order. */
export interface Embeddings {
  vectors: number[][];
  /** Length of each vector (0 for no vectors). */
  dimensions: number;
  usage: Usage | undefined;
  /** Integer micro-USD; `known: false` means no price is known (not "free"). */
  cost: Cost | undefined;
  model: string;
  provider: string;
  requestId: string;
}

export interface ClientOptions {
  /** Default: insecure (plaintext), as for a daemon on loopback or inside a cluster. */
  credentials?: ChannelCredentials;
  /** Sent as `authorization: Bearer <apiKey>` on every call. */
  apiKey?: string;
  /** Default deadline of every call, in milliseconds; `undefined` in a call keeps it. Default 300 s. */
  timeoutMs?: number;
  channelOptions?: ChannelOptions;
}

export type HealthStatus = "UNKNOWN" | "SERVING" | "NOT_SERVING" | "SERVICE_UNKNOWN";

const ROLES: Record<RoleName, Role> = {
  system: Role.ROLE_SYSTEM,
  user: Role.ROLE_USER,
  assistant: Role.ROLE_ASSISTANT,
  tool: Role.ROLE_TOOL,
};

const FINISH_REASONS: Record<FinishReason, FinishReasonName> = {
  [FinishReason.FINISH_REASON_UNSPECIFIED]: "unspecified",
  [FinishReason.FINISH_REASON_STOP]: "stop",
  [FinishReason.FINISH_REASON_LENGTH]: "length",
  [FinishReason.FINISH_REASON_TOOL_CALLS]: "tool_calls",
  [FinishReason.FINISH_REASON_CONTENT_FILTER]: "content_filter",
  [FinishReason.FINISH_REASON_OTHER]: "other",
  [FinishReason.FINISH_REASON_REFUSAL]: "refusal",
  [FinishReason.UNRECOGNIZED]: "unspecified",
};

const NO_USAGE: Usage = {
  inputTokens: 0,
  outputTokens: 0,
  cachedInputTokens: 0,
  cacheWriteInputTokens: 0,
  estimated: false,
  reasoningTokens: 0,
  cacheWrite1hInputTokens: 0,
};
const NO_COST: Cost = { known: false, inputMicroUsd: 0, outputMicroUsd: 0, totalMicroUsd: 0 };

export function user(text: string): Message {
  return message("user", text);
}
export function system(text: string): Message {
  return message("system", text);
}
export function assistant(text: string, toolCalls: ToolCall[] = []): Message {
  return { ...message("assistant", text), toolCalls };
}
export function toolResult(toolCallId: string, content: string, isError = false): Message {
  return { ...message("tool", content), toolCallId, isError };
}

function message(role: RoleName, text: string): Message {
  return {
    role: ROLES[role],
    content: text ? [{ part: { $case: "text", value: text }, cacheControl: undefined }] : [],
    toolCalls: [],
    toolCallId: "",
    isError: false,
  };
}

function toMessage(m: MessageInput): Message {
  if (typeof m.role === "number") {
    return m as Message;
  }
  const short = m as Exclude<MessageInput, Message>;
  if (!(short.role in ROLES)) {
    throw new TypeError(`unknown role ${JSON.stringify(short.role)}: use one of ${Object.keys(ROLES).join(", ")}`);
  }
  return { ...message(short.role, short.content), toolCallId: short.toolCallId ?? "", isError: short.isError ?? false };
}

function messages(input: string | MessageInput[]): Message[] {
  return typeof input === "string" ? [user(input)] : input.map(toMessage);
}

export function eventFromProto(msg: StreamCompleteResponse): StreamEvent | undefined {
  const ev = msg.event;
  switch (ev?.$case) {
    case "start":
      return { type: "start", ...ev.value };
    case "textDelta":
      return { type: "textDelta", text: ev.value.text };
    case "reasoningDelta":
      return { type: "reasoningDelta", ...ev.value };
    case "toolCallDelta":
      return { type: "toolCallDelta", ...ev.value };
    case "end":
      return {
        type: "end",
        finishReason: FINISH_REASONS[ev.value.finishReason] ?? "unspecified",
        usage: ev.value.usage ?? NO_USAGE,
        cost: ev.value.cost ?? NO_COST,
        refusal: ev.value.refusal,
      };
    default:
      return undefined; // an event type added to the proto after this client was built
  }
}

function answerFromProto(resp: CompleteResponse): Answer {
  const msg = resp.message;
  const text = (msg?.content ?? [])
    .map((p) => (p.part?.$case === "text" ? p.part.value : ""))
    .join("");
  return {
    text,
    toolCalls: (msg?.toolCalls ?? []).map((t) => ({ id: t.id, name: t.name, arguments: t.arguments })),
    finishReason: FINISH_REASONS[resp.finishReason] ?? "unspecified",
    usage: resp.usage ?? NO_USAGE,
    cost: resp.cost ?? NO_COST,
    model: resp.model,
    provider: resp.provider,
    requestId: resp.requestId,
    reasoning: (msg?.content ?? []).map((p) => (p.part?.$case === "reasoning" ? p.part.value.text : "")).join(""),
    refusal: resp.refusal,
    message: msg ?? { role: Role.ROLE_ASSISTANT, content: [], toolCalls: [], toolCallId: "", isError: false },
  };
}

/**
 * A streamed assistant turn assembled as the unary answer would be: text and reasoning parts
 * in order (signatures and redacted blocks kept), then the tool calls. Feed it every event;
 * `message()` is the turn to send back in history (an Anthropic tool loop with thinking
 * needs the signed blocks unchanged).
 */
export class Turn {
  private providerType = "";
  private readonly parts: Message["content"] = [];
  private readonly calls = new Map<number, { id: string; name: string; args: string }>();
  private reasoningIndex = -1;

  add(ev: StreamEvent): void {
    const last = this.parts[this.parts.length - 1]?.part;
    if (ev.type === "start") {
      this.providerType = ev.providerType;
    } else if (ev.type === "textDelta") {
      if (last?.$case === "text") {
        last.value += ev.text;
      } else if (ev.text) {
        this.parts.push({ part: { $case: "text", value: ev.text }, cacheControl: undefined });
      }
    } else if (ev.type === "reasoningDelta") {
      if (last?.$case === "reasoning" && this.reasoningIndex === ev.index) {
        last.value.text += ev.text;
        last.value.signature += ev.signature;
        last.value.redactedData += ev.redactedData;
      } else {
        this.reasoningIndex = ev.index;
        this.parts.push({
          part: {
            $case: "reasoning",
            value: { text: ev.text, signature: ev.signature, redactedData: ev.redactedData, providerType: this.providerType },
          },
          cacheControl: undefined,
        });
      }
    } else if (ev.type === "toolCallDelta") {
      const call = this.calls.get(ev.index) ?? { id: "", name: "", args: "" };
      call.id = ev.id || call.id;
      call.name = ev.name || call.name;
      call.args += ev.argumentsDelta;
      this.calls.set(ev.index, call);
    }
  }

  message(): Message {
    const toolCalls = [...this.calls.entries()]
      .sort(([a], [b]) => a - b)
      .map(([, c]) => ({ id: c.id, name: c.name, arguments: c.args || "{}" }));
    return { role: Role.ROLE_ASSISTANT, content: this.parts, toolCalls, toolCallId: "", isError: false };
  }
}

export class BrokerClient {
  readonly stub: ModelBrokerClient;
  readonly health: HealthClient;
  private readonly apiKey: string | undefined;
  private readonly timeoutMs: number | undefined;

  constructor(target: string, options: ClientOptions = {}) {
    const creds = options.credentials ?? grpcCredentials.createInsecure();
    this.stub = new ModelBrokerClient(target, creds, options.channelOptions);
    // One channel for both services: the health client reuses the broker client's channel.
    this.health = new HealthClient(target, creds, { channelOverride: this.stub.getChannel() });
    this.apiKey = options.apiKey;
    this.timeoutMs = "timeoutMs" in options ? options.timeoutMs : 300_000;
  }

  close(): void {
    this.stub.close();
  }

  /**
   * Stream a completion: `start`, then `textDelta` / `toolCallDelta`, then `end` with usage
   * and cost. Breaking out of the loop early cancels the call (and the upstream generation).
   */
  async *stream(model: string, input: string | MessageInput[], options: CompletionOptions = {}): AsyncGenerator<StreamEvent, void, undefined> {
    const { signal } = options;
    throwIfAborted(signal);
    const req = StreamCompleteRequest.fromPartial({ ...this.request(model, input, options) });
    const call = this.stub.streamComplete(req, this.metadata(options), this.callOptions(options));
    const cancel = (): void => call.cancel();
    signal?.addEventListener("abort", cancel, { once: true });
    let finished = false;
    try {
      for await (const msg of call as AsyncIterable<StreamCompleteResponse>) {
        const ev = eventFromProto(msg);
        if (ev !== undefined) {
          yield ev;
        }
      }
      finished = true;
    } catch (err) {
      throw toBrokerError(err, signal);
    } finally {
      signal?.removeEventListener("abort", cancel);
      if (!finished) {
        call.cancel(); // the consumer stopped early or failed: stop paying for tokens nobody reads
      }
    }
  }

  /** The whole answer at once (the stream, accumulated by the daemon). */
  async complete(model: string, input: string | MessageInput[], options: CompletionOptions = {}): Promise<Answer> {
    const req = CompleteRequest.fromPartial({ ...this.request(model, input, options) });
    const resp = await this.unary<CompleteResponse>(options, (md, opts, cb) => this.stub.complete(req, md, opts, cb));
    return answerFromProto(resp);
  }

  /** Embedding vectors for `inputs` (a string is one input), in input order. */
  async embed(model: string, inputs: string | string[], options: EmbedOptions = {}): Promise<Embeddings> {
    const req = EmbedRequest.fromPartial({
      model,
      inputs: typeof inputs === "string" ? [inputs] : inputs,
      dimensions: options.dimensions,
      fallbackModels: options.fallbackModels ?? [],
      requirements: options.minDimensions ? { minDimensions: options.minDimensions } : undefined,
    });
    const resp = await this.unary<EmbedResponse>(options, (md, opts, cb) => this.stub.embed(req, md, opts, cb));
    const vectors = [...resp.embeddings].sort((a, b) => a.index - b.index).map((e) => e.values);
    return {
      vectors,
      dimensions: vectors[0]?.length ?? 0,
      usage: resp.usage,
      cost: resp.cost,
      model: resp.model,
      provider: resp.provider,
      requestId: resp.requestId,
    };
  }

  /** Every model, all pages (the daemon answers at most 1000 per ListModels call). */
  async listModels(provider = "", options: CallOptions = {}): Promise<ModelInfo[]> {
    const models: ModelInfo[] = [];
    let pageToken = "";
    do {
      const req = ListModelsRequest.fromPartial({ provider, pageToken });
      const resp = await this.unary<ListModelsResponse>(options, (md, opts, cb) =>
        this.stub.listModels(req, md, opts, cb),
      );
      models.push(...resp.models);
      pageToken = resp.nextPageToken;
    } while (pageToken);
    return models;
  }

  async getModel(model: string, options: CallOptions = {}): Promise<ModelInfo | undefined> {
    const resp = await this.unary<{ model?: ModelInfo }>(options, (md, opts, cb) =>
      this.stub.getModel({ model }, md, opts, cb),
    );
    return resp.model;
  }

  async listProviders(options: CallOptions = {}): Promise<ProviderInfo[]> {
    const resp = await this.unary<ListProvidersResponse>(options, (md, opts, cb) =>
      this.stub.listProviders({}, md, opts, cb),
    );
    return resp.providers;
  }

  /**
   * GetUsage: this key's spend, budget left, requests and tokens for the UTC day and month.
   * An admin key may name other keys, and sees every key when it names none.
   */
  async getUsage(keyNames: string[] = [], options: CallOptions = {}): Promise<GetUsageResponse> {
    return this.unary<GetUsageResponse>(options, (md, opts, cb) =>
      this.stub.getUsage({ keyNames }, md, opts, cb),
    );
  }

  /** grpc.health.v1 Check: "" (liveness), "modelbroker.v1.ModelBroker" (readiness) or "provider/<name>". */
  async checkHealth(service = "", options: CallOptions = {}): Promise<HealthStatus> {
    const resp = await this.unary<{ status: ServingStatus }>({ timeoutMs: 5_000, ...options }, (md, opts, cb) =>
      this.health.check({ service }, md, opts, cb),
    );
    return healthCheckResponse_ServingStatusToJSON(resp.status) as HealthStatus;
  }

  /**
   * grpc.health.v1 Watch: the current status at once, then one per change, until the signal
   * aborts (or `timeoutMs`, which defaults to none here: a watch is meant to last).
   */
  async *watchHealth(service: string, options: CallOptions = {}): AsyncGenerator<HealthStatus, void, undefined> {
    const { signal } = options;
    throwIfAborted(signal);
    const opts = options.timeoutMs === undefined ? {} : { deadline: Date.now() + options.timeoutMs };
    const call = this.health.watch({ service }, this.metadata(options), opts);
    const cancel = (): void => call.cancel();
    signal?.addEventListener("abort", cancel, { once: true });
    try {
      for await (const msg of call as AsyncIterable<{ status: ServingStatus }>) {
        yield healthCheckResponse_ServingStatusToJSON(msg.status) as HealthStatus;
      }
    } catch (err) {
      throw toBrokerError(err, signal);
    } finally {
      signal?.removeEventListener("abort", cancel);
      call.cancel();
    }
  }

  private request(model: string, input: string | MessageInput[], o: CompletionOptions): StreamCompleteRequest {
    return StreamCompleteRequest.fromPartial({
      model,
      messages: messages(input),
      tools: o.tools ?? [],
      toolChoice: o.toolChoice,
      params: o.params,
      requirements: o.requirements,
      fallbackModels: o.fallbackModels ?? [],
      metadata: o.metadata_,
      providerOptions: o.providerOptions ?? {},
    });
  }

  private metadata(options: CallOptions): Metadata {
    const md = new Metadata();
    for (const [k, v] of Object.entries(options.metadata ?? {})) {
      md.set(k, v);
    }
    if (this.apiKey) {
      md.set("authorization", `Bearer ${this.apiKey}`);
    }
    return md;
  }

  private callOptions(options: CallOptions): Partial<GrpcCallOptions> {
    const ms = options.timeoutMs ?? this.timeoutMs;
    return ms === undefined ? {} : { deadline: Date.now() + ms };
  }

  private unary<T>(
    options: CallOptions,
    start: (
      md: Metadata,
      opts: Partial<GrpcCallOptions>,
      cb: (err: Error | null, resp: T) => void,
    ) => { cancel(): void },
  ): Promise<T> {
    const { signal } = options;
    throwIfAborted(signal);
    return new Promise<T>((resolve, reject) => {
      // grpc-js never calls back synchronously, so `cancel` is bound before it can run.
      const call = start(this.metadata(options), this.callOptions(options), (err, resp) => {
        signal?.removeEventListener("abort", cancel);
        if (err) {
          reject(toBrokerError(err, signal));
        } else {
          resolve(resp);
        }
      });
      const cancel = (): void => call.cancel();
      signal?.addEventListener("abort", cancel, { once: true });
    });
  }
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    throw new CancelledError(Status.CANCELLED, "cancelled by the caller before the call started", { cause: signal.reason });
  }
}
