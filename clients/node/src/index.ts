// Public surface of the Node client. The generated stubs stay importable for anything the
// thin client does not wrap: `@model-broker/client/dist/gen/modelbroker/v1/broker`.
export * from "./client";
export * from "./errors";
export {
  Capability,
  type Cost,
  type GenerationParams,
  type GetUsageResponse,
  type KeyUsage,
  type Message,
  ModelKind,
  type ModelInfo,
  Preference,
  type ProviderInfo,
  ProviderHealth,
  type Requirements,
  ResponseFormat,
  Role,
  type Tool,
  type ToolChoice,
  ToolChoiceMode,
  type Usage,
  type UsageWindow,
} from "../gen/modelbroker/v1/broker";
