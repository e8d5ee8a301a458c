/**
 * Checkpoints: signed statements of the audit trail's head, written outside
 * NATS, so that whoever administers NATS cannot truncate, replace or edit the
 * trail without the checkpoints contradicting it (the role CloudTrail's digest
 * files play). Each writer (a broker replica, named by its signing key id)
 * keeps a chain of checkpoints: each one names the hash of the one before, so a
 * missing checkpoint is seen too.
 * @module
 */
import { createHash } from "node:crypto";
import { mkdir, open, readdir, readFile, truncate } from "node:fs/promises";
import { join } from "node:path";
import type { JsonValue } from "@bufbuild/protobuf";
import { fromJson } from "@bufbuild/protobuf";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import { auditStream } from "../../common/subjects.js";
import { type AuditEvent, AuditEventSchema } from "../../proto/index.js";
import { sortKeys } from "./log.js";
import { type AuditSigner, signHash } from "./signing.js";

/** One signed statement: "at `at`, event `sequence` of `stream` had hash `headSha256`, and event 1 had `genesisSha256`". */
export interface Checkpoint {
  /** Whose chain this checkpoint is in: the writing replica's signing key id. */
  readonly writer: string;
  /** Position in the writer's chain, from 1. */
  readonly index: number;
  readonly stream: string;
  /** The trail's last event when the checkpoint was taken; 0 for an empty trail. */
  readonly sequence: number;
  /** That event's hash, hex; empty for an empty trail. */
  readonly headSha256: string;
  /** The hash of event 1, hex: which history this is. Empty for an empty trail. */
  readonly genesisSha256: string;
  /** When it was taken (RFC 3339). */
  readonly at: string;
  /** The hash of the writer's previous checkpoint, hex; empty for its first. */
  readonly prevSha256: string;
  readonly keyId: string;
  /** Ed25519 over the checkpoint context and {@link checkpointHash}, base64. */
  readonly signature: string;
}

/** The fields as they are stored (one JSON object per line), signature last. */
function checkpointJson(checkpoint: Omit<Checkpoint, "signature">): Record<string, string | number> {
  return {
    writer: checkpoint.writer,
    index: checkpoint.index,
    stream: checkpoint.stream,
    sequence: checkpoint.sequence,
    head_sha256: checkpoint.headSha256,
    genesis_sha256: checkpoint.genesisSha256,
    at: checkpoint.at,
    prev_checkpoint_sha256: checkpoint.prevSha256,
    key_id: checkpoint.keyId,
  };
}

/** SHA-256 over the checkpoint's fields (not its signature) as JSON with sorted keys. */
export function checkpointHash(checkpoint: Omit<Checkpoint, "signature">): Uint8Array {
  return createHash("sha256")
    .update(JSON.stringify(sortKeys(checkpointJson(checkpoint))))
    .digest();
}

/** A checkpoint as one line of a checkpoint file. */
export function checkpointToJsonLine(checkpoint: Checkpoint): string {
  return JSON.stringify({ ...checkpointJson(checkpoint), signature: checkpoint.signature });
}

/** Parses one line of a checkpoint file; `undefined` when it is not a checkpoint. */
export function checkpointFromJsonLine(line: string): Checkpoint | undefined {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return undefined;
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) return undefined;
  const record = value as Record<string, unknown>;
  const text = (key: string) => (typeof record[key] === "string" ? record[key] : undefined);
  const whole = (key: string) => (typeof record[key] === "number" && Number.isSafeInteger(record[key]) && record[key] >= 0 ? record[key] : undefined);
  const fields = {
    writer: text("writer"),
    index: whole("index"),
    stream: text("stream"),
    sequence: whole("sequence"),
    headSha256: text("head_sha256"),
    genesisSha256: text("genesis_sha256"),
    at: text("at"),
    prevSha256: text("prev_checkpoint_sha256"),
    keyId: text("key_id"),
    signature: text("signature"),
  };
  if (Object.values(fields).some((field) => field === undefined)) return undefined;
  return fields as Checkpoint;
}

/**
 * Where checkpoints go. It must be outside the control of whoever administers
 * NATS: a directory on another system, an object store with object lock, a
 * webhook to another team. Writes are appends; nothing is ever rewritten.
 */
export interface CheckpointSink {
  /** Where checkpoints go, for logs. */
  readonly description: string;
  /** The writer's newest checkpoint, to continue its chain after a restart. */
  last(writer: string): Promise<Checkpoint | undefined>;
  /** Stores a checkpoint durably; rejects if it could not. */
  append(checkpoint: Checkpoint): Promise<void>;
}

/** A writer name or key id safe as one path component. */
const safeName = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;

/**
 * The first sink: a directory, with one folder per writer and one append-only
 * file per period (`<dir>/<writer>/2026-12-04T20.jsonl` for hourly periods),
 * each line a checkpoint, synced to disk before the append resolves.
 */
export class DirectoryCheckpointSink implements CheckpointSink {
  readonly description: string;
  private readonly dir: string;
  private readonly periodMs: number;

  constructor(dir: string, periodMs: number) {
    this.dir = dir;
    this.periodMs = periodMs;
    this.description = `directory ${dir}`;
  }

  /**
   * The writer's checkpoint with the highest index, wherever it is: a clock set
   * back puts a newer checkpoint in an older period's file. A line torn by a
   * crash mid-append (the file does not end in a newline) was never a written
   * checkpoint (its append never resolved), so it is cut off here rather than
   * left to block the chain or to glue itself to the next line.
   */
  async last(writer: string): Promise<Checkpoint | undefined> {
    let newest: Checkpoint | undefined;
    for (const file of await checkpointFiles(join(this.dir, writer))) {
      let text = await readFile(file, "utf8");
      if (text !== "" && !text.endsWith("\n")) {
        const kept = text.lastIndexOf("\n") + 1;
        await truncate(file, Buffer.byteLength(text.slice(0, kept)));
        text = text.slice(0, kept);
      }
      for (const line of text.split("\n")) {
        if (line.trim() === "") continue;
        const checkpoint = checkpointFromJsonLine(line);
        // A whole line that does not parse is verification's finding (checkpoint_malformed); the chain continues past it.
        if (checkpoint !== undefined && checkpoint.writer === writer && (newest === undefined || checkpoint.index > newest.index)) newest = checkpoint;
      }
    }
    return newest;
  }

  async append(checkpoint: Checkpoint): Promise<void> {
    if (!safeName.test(checkpoint.writer)) throw new AirlockError(Code.InvalidArgument, `checkpoint writer ${JSON.stringify(checkpoint.writer)} is not a safe file name`);
    const folder = join(this.dir, checkpoint.writer);
    await mkdir(folder, { recursive: true, mode: 0o750 });
    const start = Math.floor(Date.parse(checkpoint.at) / this.periodMs) * this.periodMs;
    // Names sort in time order, and an hour, a minute or a second period each get distinct names.
    const name = `${new Date(start).toISOString().replace(/\.\d{3}Z$/, "").replace(/:/g, "")}.jsonl`;
    const file = await open(join(folder, name), "a", 0o640);
    try {
      await file.appendFile(`${checkpointToJsonLine(checkpoint)}\n`);
      await file.sync();
    } finally {
      await file.close();
    }
  }
}

/** The checkpoint files under one writer's folder, oldest first. */
async function checkpointFiles(folder: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(folder);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw error;
  }
  return names
    .filter((name) => name.endsWith(".jsonl"))
    .sort()
    .map((name) => join(folder, name));
}

/** What {@link readCheckpointDirectory} found: the checkpoints, and lines that are not checkpoints. */
export interface CheckpointFiles {
  readonly checkpoints: Checkpoint[];
  readonly malformed: ReadonlyArray<{ readonly file: string; readonly line: number }>;
}

/** Reads every writer's checkpoints from a {@link DirectoryCheckpointSink} directory. */
export async function readCheckpointDirectory(dir: string): Promise<CheckpointFiles> {
  const checkpoints: Checkpoint[] = [];
  const malformed: Array<{ file: string; line: number }> = [];
  let writers: string[];
  try {
    writers = (await readdir(dir, { withFileTypes: true })).filter((entry) => entry.isDirectory()).map((entry) => entry.name);
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `cannot read the checkpoint directory ${dir}`, { cause: error, details: { dir } });
  }
  for (const writer of writers.sort()) {
    for (const file of await checkpointFiles(join(dir, writer))) {
      for (const [index, line] of (await readFile(file, "utf8")).split("\n").entries()) {
        if (line.trim() === "") continue;
        const checkpoint = checkpointFromJsonLine(line);
        if (checkpoint === undefined) malformed.push({ file, line: index + 1 });
        else checkpoints.push(checkpoint);
      }
    }
  }
  return { checkpoints, malformed };
}

/** Options of {@link Checkpointer.start}. */
export interface CheckpointerOptions {
  readonly nc: NatsConnection;
  readonly sink: CheckpointSink;
  readonly signer: AuditSigner;
  /** A checkpoint after this many events written by this replica. */
  readonly everyEvents: number;
  /** And at least this often, written or not, so a gap in time shows too, in ms. */
  readonly intervalMs: number;
  readonly log: Logger;
  /** Told each checkpoint's outcome: `written`, or the reason it was refused. */
  readonly onOutcome?: (outcome: string) => void;
  /** @default () => new Date() */
  readonly now?: () => Date;
}

/** Defaults of the broker's `audit.checkpoints` settings. */
export const checkpointDefaults = { everyEvents: 1000, interval: "10m", period: "1h" } as const;

/**
 * Takes checkpoints of the trail for one replica: every
 * {@link CheckpointerOptions.everyEvents} events it writes, on a timer, and
 * when it stops. Before each one it checks that the trail still holds what its
 * previous checkpoint said; if not, it writes nothing and reports the trail as
 * rewritten (`onOutcome`), so a checkpoint never blesses a rewritten history.
 */
export class Checkpointer {
  private readonly options: CheckpointerOptions;
  private readonly jsm: JetStreamManager;
  private previous: Checkpoint | undefined;
  private sinceLast = 0;
  private queued = false;
  private running: Promise<void> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;

  private constructor(options: CheckpointerOptions, jsm: JetStreamManager, previous: Checkpoint | undefined) {
    this.options = options;
    this.jsm = jsm;
    this.previous = previous;
  }

  /** Continues the writer's chain from the sink's newest checkpoint and starts the timer. */
  static async start(options: CheckpointerOptions): Promise<Checkpointer> {
    if (!safeName.test(options.signer.keyId)) {
      throw new AirlockError(Code.InvalidArgument, `audit key id ${JSON.stringify(options.signer.keyId)} must be a plain name (letters, digits, . _ -): it names the checkpoint chain`);
    }
    const checkpointer = new Checkpointer(options, await jetstreamManager(options.nc, { checkAPI: false }), await options.sink.last(options.signer.keyId));
    checkpointer.timer = setInterval(() => void checkpointer.checkpoint(), options.intervalMs);
    checkpointer.timer.unref();
    return checkpointer;
  }

  /** The newest checkpoint this replica wrote or continued from. */
  get newest(): Checkpoint | undefined {
    return this.previous;
  }

  /** Counts events this replica wrote; checkpoints once enough have been. */
  noteWritten(count: number): void {
    this.sinceLast += count;
    if (this.sinceLast < this.options.everyEvents || this.queued) return;
    this.queued = true;
    void this.checkpoint().finally(() => {
      this.queued = false;
      // Events written while it ran may already call for the next one.
      this.noteWritten(0);
    });
  }

  /** Takes a checkpoint now (after any in progress); resolves once it is stored or refused. Never rejects. */
  checkpoint(): Promise<void> {
    this.running = this.running.then(() => this.take());
    return this.running;
  }

  /** Stops the timer and takes a last checkpoint if events were written since the previous one. */
  async close(): Promise<void> {
    clearInterval(this.timer);
    if (this.sinceLast > 0) await this.checkpoint();
    await this.running;
  }

  private async event(sequence: number): Promise<AuditEvent | undefined> {
    const message = await this.jsm.direct.getMessage(auditStream.name, { seq: sequence });
    if (message === null) return undefined;
    try {
      return fromJson(AuditEventSchema, message.json<JsonValue>());
    } catch {
      return undefined;
    }
  }

  private async take(): Promise<void> {
    const written = this.sinceLast;
    try {
      const last = await this.jsm.direct.getMessage(auditStream.name, { last_by_subj: auditStream.subject });
      const head = last === null ? undefined : fromJson(AuditEventSchema, last.json<JsonValue>());
      const genesis = head === undefined ? undefined : await this.event(1);
      const previous = this.previous;
      // Two replicas checkpointing under one key id would fork the chain (and verification would call it a gap): refuse, loudly.
      const stored = await this.options.sink.last(this.options.signer.keyId);
      if (stored?.index !== previous?.index) {
        this.options.onOutcome?.("writer_conflict");
        this.options.log.error({ keyId: this.options.signer.keyId, ours: previous?.index ?? 0, stored: stored?.index ?? 0 }, "another writer adds checkpoints under this key id; each broker replica needs its own audit key; no checkpoint written");
        return;
      }
      const hex = (bytes: Uint8Array | undefined) => (bytes === undefined ? "" : Buffer.from(bytes).toString("hex"));
      if (previous !== undefined && previous.sequence > 0) {
        // The trail must still be the history the previous checkpoint named.
        const then = await this.event(previous.sequence);
        const reason =
          genesis === undefined || hex(genesis.sha256) !== previous.genesisSha256
            ? "trail_replaced"
            : then === undefined || head === undefined || Number(head.sequence) < previous.sequence
              ? "trail_truncated"
              : hex(then.sha256) !== previous.headSha256
                ? "trail_edited"
                : undefined;
        if (reason !== undefined) {
          this.options.onOutcome?.(reason);
          this.options.log.error({ reason, checkpoint: previous.index, sequence: previous.sequence }, "the audit trail no longer holds what the last checkpoint recorded; no checkpoint written");
          return;
        }
      }
      const unsigned: Omit<Checkpoint, "signature"> = {
        writer: this.options.signer.keyId,
        index: (previous?.index ?? 0) + 1,
        stream: auditStream.name,
        sequence: head === undefined ? 0 : Number(head.sequence),
        headSha256: hex(head?.sha256),
        genesisSha256: hex(genesis?.sha256),
        // Never before the previous checkpoint (verification requires it), even if the clock was set back.
        at: new Date(Math.max((this.options.now?.() ?? new Date()).getTime(), previous === undefined ? 0 : Date.parse(previous.at))).toISOString(),
        prevSha256: previous === undefined ? "" : hex(checkpointHash(previous)),
        keyId: this.options.signer.keyId,
      };
      const checkpoint: Checkpoint = { ...unsigned, signature: Buffer.from(signHash("checkpoint", checkpointHash(unsigned), this.options.signer)).toString("base64") };
      await this.options.sink.append(checkpoint);
      this.previous = checkpoint;
      this.sinceLast = Math.max(0, this.sinceLast - written);
      this.options.onOutcome?.("written");
    } catch (error) {
      this.options.onOutcome?.("failed");
      this.options.log.error({ err: error, sink: this.options.sink.description }, "could not write an audit checkpoint");
    }
  }
}
