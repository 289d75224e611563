// Type declarations of broker.js, the JavaScript client of redis-ws-broker (wire protocol: docs/protocol.md).

/** Any JSON value (a payload). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** The codes of `error` frames (a closed set; an unknown one from a newer broker becomes a plain BrokerError). */
export type ErrorCode =
  | "bad_request"
  | "payload_too_large"
  | "unauthorized"
  | "forbidden"
  | "rate_limited"
  | "not_found"
  | "stale_receipt"
  | "unavailable"
  | "internal";

/** Root of every error the client rejects with; `code` is the error frame's code. */
export class BrokerError extends Error {
  constructor(message: string, opts?: { retryAfterMs?: number | null; id?: string | null });
  readonly code: ErrorCode;
  /** When the broker suggests retrying (unavailable, rate_limited), else null. */
  retryAfterMs: number | null;
  /** The message an ack/nack/extend error is about, else null. */
  id: string | null;
}
/** `bad_request`: the frame was refused (invalid name, field, range...). */
export class ProtocolError extends BrokerError {}
/** `payload_too_large` (a ProtocolError too). */
export class PayloadTooLargeError extends ProtocolError {}
/** `unauthorized`: the handshake was refused with HTTP 401 (missing, wrong or expired token). */
export class UnauthorizedError extends BrokerError {}
/** `forbidden`: a topic outside the token's patterns, or a handshake refused with HTTP 403 (Origin). */
export class ForbiddenError extends BrokerError {}
/** `rate_limited`: over the publish rate; see retryAfterMs. */
export class RateLimitedError extends BrokerError {}
/** `not_found`: a publish to a topic with no group while the broker rejects those. */
export class NotFoundError extends BrokerError {}
/** `stale_receipt`: a settle of a delivery this connection no longer holds (also raised at once, locally, for a
 * delivery whose connection is gone). */
export class StaleReceiptError extends BrokerError {}
/** `unavailable`: Redis down, breaker open, broker shutting down, connection lost, or no answer in time. */
export class UnavailableError extends BrokerError {}

export const ERROR_CLASSES: Readonly<Record<ErrorCode, typeof BrokerError>>;
/** The typed error of an `error` frame (or of a batch result's `error` object). */
export function errorFromFrame(frame: {
  code?: string;
  message?: string;
  retry_after_ms?: number | null;
  id?: string | null;
}): BrokerError;

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** A WebSocket constructor: the browser's own, Node 22's global one, or the `ws` package's. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[], options?: any) => any;

export interface ConnectOptions {
  /** Sent as `Authorization: Bearer` (tokenIn "header") or `?token=` (tokenIn "query"). */
  token?: string | null;
  /** Default: globalThis.WebSocket (browsers, Node >= 22). In Node 20 pass the `ws` package's. */
  WebSocket?: WebSocketConstructor;
  /** Default "header" when a WebSocket implementation is passed (it takes options), else "query" (browsers cannot
   * set handshake headers). */
  tokenIn?: "header" | "query";
  /** Reconnect after a lost connection (default true). */
  reconnect?: boolean;
  /** Longest wait for an answer, and for a connection before a request (default 30 000). */
  requestTimeoutMs?: number;
  /** Reconnects, and retries of publishes, stop after this long (default 300 000). */
  reconnectDeadlineMs?: number;
  /** Publishes made in the same turn (a loop, Promise.all) leave as batch frames of at most 100 messages, each
   * caller still getting its own answer (default true; as the Python client's auto_batch). */
  autoBatch?: boolean;
}

export interface PublishOptions {
  /** String headers, delivered with the message. */
  headers?: Record<string, string>;
  /** Deduplicates publishes to the same topic; generated when absent, so retries never store twice. */
  idempotencyKey?: string;
  /** Deliver no earlier than this many ms from now. */
  delayMs?: number;
  /** Ordering key: one message per key in flight per group, in publish order. */
  key?: string;
  /** This message's own attempt limit. */
  maxAttempts?: number;
  /** This message's own retry backoff base. */
  backoffBaseMs?: number;
  /** Resend across outages and reconnects until confirmed or reconnectDeadlineMs (default true). */
  retry?: boolean;
}

export interface Published {
  id: string;
  /** True when the idempotency key was known: nothing new was stored, `id` is the first one. */
  duplicate: boolean;
}

export interface BatchMessage extends Omit<PublishOptions, "retry"> {
  topic: string;
  payload: Json;
}

export interface SubscribeOptions {
  /** Default "default". */
  group?: string | null;
  /** Most unacked deliveries at once, per topic (broker default 10). */
  prefetch?: number | null;
  /** Lease of each delivery (broker default 30 000). */
  leaseMs?: number | null;
  /** Deliveries arrive as `messages` frames (the iterator is the same). */
  batch?: boolean;
}

export interface PullOptions {
  /** Most deliveries in the answer (default 1). */
  max?: number;
  /** How long to wait for the first delivery (default 0). */
  waitMs?: number;
  leaseMs?: number | null;
}

export interface StatusRow {
  topic: string;
  group: string;
  state: "ready" | "leased" | "retry_wait" | "dead" | "done";
  attempts: number;
  position?: number;
  consumer?: string;
  node?: string;
  until?: number;
  due?: number;
  reason?: "rejected" | "max_attempts";
  died_at?: number;
  ttl_s?: number;
  last_error?: string;
}

/** One delivery. Settle it on the connection that carried it. */
export class Message<P = Json> {
  readonly id: string;
  readonly topic: string;
  readonly group: string;
  readonly payload: P;
  readonly headers: Record<string, string>;
  /** 1 on the first delivery; more means a duplicate is possible. */
  readonly attempt: number;
  readonly receipt: string;
  readonly publishedAt: number;
  leaseExpiresAt: number;
  readonly key: string | null;
  /** Done for this group. Without `wait` it resolves once sent (a failure then comes as the client's `error`
   * event); with it, on the broker's `acked`. Rejects at once with StaleReceiptError when its connection is gone. */
  ack(opts?: { wait?: boolean }): Promise<unknown>;
  /** Retry after `delayMs` (default: backoff policy; 0: at once, at the head), or dead-letter (`dead`). With
   * `wait` it resolves with the `nacked` frame (`outcome`: retry, ready or dead). */
  nack(opts?: { error?: string; delayMs?: number | null; dead?: boolean; wait?: boolean }): Promise<any>;
  /** Lease until now + leaseMs; resolves with the new deadline (epoch ms). */
  extend(leaseMs: number): Promise<number>;
}

/** The deliveries of one subscribe call. Leaving a `for await` loop keeps the subscription. */
export class Subscription<P = Json> implements AsyncIterable<Message<P>> {
  readonly topics: string[];
  readonly group: string;
  /** The next delivery; rejects with UnavailableError when `timeoutMs` passes first. */
  next(opts?: { timeoutMs?: number | null }): Promise<IteratorResult<Message<P>, undefined>>;
  /** One delivery; rejects when the wait runs out or the subscription ended. */
  get(opts?: { timeoutMs?: number | null }): Promise<Message<P>>;
  [Symbol.asyncIterator](): AsyncIterator<Message<P>, undefined>;
  /** No new deliveries; the iterator ends. */
  unsubscribe(): Promise<void>;
}

export interface StateChangeDetail {
  state: ConnectionState;
  previous: ConnectionState;
  /** Why it closed, when it was not close(). */
  error: BrokerError | null;
}
export interface PausedDetail {
  topic: string;
  group: string;
  reason: string;
  retryAfterMs: number | null;
}
export interface ResumedDetail {
  topic: string;
  group: string;
}
export interface BrokerClientEventMap {
  statechange: CustomEvent<StateChangeDetail>;
  paused: CustomEvent<PausedDetail>;
  resumed: CustomEvent<ResumedDetail>;
  /** An error frame that answers no request (e.g. of an ack sent without `wait`). */
  error: CustomEvent<{ error: BrokerError }>;
}

export class BrokerClient extends EventTarget {
  constructor(url: string, opts?: ConnectOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly tokenIn: "header" | "query";
  /** Open the first connection (connect() does this); rejects with a typed error when it cannot. */
  connect(): Promise<this>;
  close(): Promise<void>;
  /**
   * Resolves once Redis holds the message. Rejects with a typed BrokerError, or at once with the TypeError of
   * JSON.stringify for a payload JSON cannot encode (a BigInt, a cycle). Integers above 2^53 lose precision in
   * JavaScript: send them as strings.
   */
  publish(topic: string, payload: Json, opts?: PublishOptions): Promise<Published>;
  /** One result per message, in order: Published, or the BrokerError of that message. */
  publishBatch(messages: BatchMessage[], opts?: { retry?: boolean }): Promise<Array<Published | BrokerError>>;
  subscribe<P = Json>(topic: string | string[], opts?: SubscribeOptions): Promise<Subscription<P>>;
  pull<P = Json>(topic: string, group?: string | null, opts?: PullOptions): Promise<Message<P>[]>;
  messageStatus(id: string, topic: string): Promise<StatusRow[]>;
  ping(): Promise<void>;
  /** Send any client frame with a fresh ref; resolves with the answer frame. */
  request(frame: { op: string; [field: string]: unknown }, opts?: { extraWaitMs?: number }): Promise<any>;

  addEventListener<K extends keyof BrokerClientEventMap>(
    type: K,
    listener: (ev: BrokerClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof BrokerClientEventMap>(
    type: K,
    listener: (ev: BrokerClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/** Connect and resolve with an open client. */
export function connect(url: string, opts?: ConnectOptions): Promise<BrokerClient>;
