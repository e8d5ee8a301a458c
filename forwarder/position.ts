import { constants } from "node:fs";
import { access, open, readFile, rename } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { AirlockError, Code } from "../common/errors.js";

/** The position file's content: per sink name, the last audit sequence the sink acknowledged. */
interface PositionFileContent {
  readonly version: 1;
  readonly sinks: Record<string, { readonly sequence: string }>;
}

/**
 * The durable position of every sink: the last audit sequence each one
 * acknowledged, in one JSON file. A write goes to a temporary file in the same
 * directory, is fsynced, renamed over the file and the directory fsynced, so
 * after a crash the file holds either the old positions or the new ones,
 * never a torn mix. Writes are serialized; each writes every sink's position.
 */
export class PositionStore {
  readonly file: string;
  private readonly positions: Map<string, bigint>;
  private writing: Promise<void> = Promise.resolve();

  private constructor(file: string, positions: Map<string, bigint>) {
    this.file = file;
    this.positions = positions;
  }

  /**
   * Reads the file; a missing file is every sink at 0 (nothing delivered yet).
   * @throws AirlockError `failed_precondition` when its directory is missing or not writable.
   * @throws AirlockError `data_loss` when the file exists but is not a position file:
   * guessing a position could skip events or resend the whole trail.
   */
  static async open(file: string): Promise<PositionStore> {
    // Checked now: a directory that cannot be written would otherwise show only after the first delivery.
    try {
      await access(dirname(file), constants.W_OK);
    } catch (error) {
      throw new AirlockError(Code.FailedPrecondition, `the position file's directory ${dirname(file)} does not exist or cannot be written`, { cause: error, details: { field: "position_file" } });
    }
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return new PositionStore(file, new Map());
      throw new AirlockError(Code.FailedPrecondition, `cannot read the position file ${file}`, { cause: error, details: { field: "position_file" } });
    }
    const positions = new Map<string, bigint>();
    try {
      const parsed = JSON.parse(text) as PositionFileContent;
      if (parsed.version !== 1 || typeof parsed.sinks !== "object" || parsed.sinks === null) throw new Error("not version 1");
      for (const [name, entry] of Object.entries(parsed.sinks)) {
        if (!/^\d{1,20}$/.test(entry.sequence)) throw new Error(`bad sequence for ${name}`);
        positions.set(name, BigInt(entry.sequence));
      }
    } catch (error) {
      throw new AirlockError(Code.DataLoss, `the position file ${file} is not a forwarder position file: fix or remove it (removing resends the whole trail)`, { cause: error, details: { field: "position_file" } });
    }
    return new PositionStore(file, positions);
  }

  /** The last sequence `sink` acknowledged; 0n when it never acknowledged one. */
  get(sink: string): bigint {
    return this.positions.get(sink) ?? 0n;
  }

  /** Every sink's position as read or last written. */
  all(): ReadonlyMap<string, bigint> {
    return new Map(this.positions);
  }

  /**
   * Records that `sink` acknowledged everything up to `sequence`, and resolves
   * once that is durable on disk. A position never moves back.
   */
  async set(sink: string, sequence: bigint): Promise<void> {
    // Chained, so two sinks acknowledging at once never race on the temporary file.
    const write = this.writing.then(async () => {
      if (sequence <= this.get(sink)) return;
      const next = new Map(this.positions).set(sink, sequence);
      await this.write(next);
      // Only a position that is on disk counts: a failed write leaves the old one, so it is written again.
      this.positions.set(sink, sequence);
    });
    this.writing = write.catch(() => undefined);
    await write;
  }

  private async write(positions: ReadonlyMap<string, bigint>): Promise<void> {
    const content: PositionFileContent = { version: 1, sinks: Object.fromEntries([...positions].map(([name, sequence]) => [name, { sequence: sequence.toString() }])) };
    const temporary = join(dirname(this.file), `.${basename(this.file)}.${process.pid}.tmp`);
    try {
      const handle = await open(temporary, "w", 0o600);
      try {
        await handle.writeFile(`${JSON.stringify(content)}\n`);
        await handle.sync();
      } finally {
        await handle.close();
      }
      await rename(temporary, this.file);
      // The rename itself is durable only once the directory is.
      const directory = await open(dirname(this.file), "r");
      try {
        await directory.sync();
      } finally {
        await directory.close();
      }
    } catch (error) {
      throw new AirlockError(Code.Unavailable, `cannot write the position file ${this.file}`, { cause: error, details: { field: "position_file" } });
    }
  }
}
