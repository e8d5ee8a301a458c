import { readFile } from "node:fs/promises";
import { createFileRegistry, type DescMethod, type DescService, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { AirlockError, Code } from "../common/errors.js";

/** One method the sidecar serves, and the upstream it forwards to. */
export interface ProxiedMethod {
  /** `/<package>.<Service>/<Method>`, the HTTP/2 `:path`. */
  readonly path: string;
  readonly service: DescService;
  readonly method: DescMethod;
  /** Name of the upstream that serves it. */
  readonly upstream: string;
}

/** Every method the sidecar serves, by HTTP/2 path. */
export type MethodTable = ReadonlyMap<string, ProxiedMethod>;

/** An upstream and the descriptor sets describing what it serves. */
export interface UpstreamDescriptors {
  readonly name: string;
  readonly descriptorSets: readonly string[];
  /** Only these services (fully qualified); all services in the sets when absent. */
  readonly services?: readonly string[];
}

/**
 * Loads binary FileDescriptorSets and maps every method of every (selected)
 * service to its upstream. No generated code is needed per upstream: the
 * descriptors are enough to route, and to decode a request when a rule needs it.
 */
export async function loadMethodTable(upstreams: readonly UpstreamDescriptors[]): Promise<MethodTable> {
  const table = new Map<string, ProxiedMethod>();
  for (const [index, upstream] of upstreams.entries()) {
    const services: DescService[] = [];
    for (const path of upstream.descriptorSets) {
      let bytes: Uint8Array;
      try {
        bytes = await readFile(path);
      } catch (error) {
        throw new AirlockError(Code.InvalidArgument, `cannot read descriptor set ${path}`, { cause: error, details: { field: `upstreams[${index}].descriptor_sets` } });
      }
      let registry;
      try {
        registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, bytes));
      } catch (error) {
        throw new AirlockError(Code.InvalidArgument, `${path} is not a binary FileDescriptorSet with its imports`, {
          cause: error,
          details: { field: `upstreams[${index}].descriptor_sets` },
        });
      }
      for (const type of registry) if (type.kind === "service") services.push(type);
    }
    const wanted = upstream.services === undefined ? undefined : new Set(upstream.services);
    for (const name of wanted ?? []) {
      if (!services.some((service) => service.typeName === name)) {
        throw new AirlockError(Code.InvalidArgument, `service ${name} is not in the descriptor sets of upstream ${upstream.name}`, {
          details: { field: `upstreams[${index}].services` },
        });
      }
    }
    for (const service of services) {
      if (wanted !== undefined && !wanted.has(service.typeName)) continue;
      for (const method of service.methods) {
        const path = `/${service.typeName}/${method.name}`;
        const existing = table.get(path);
        if (existing !== undefined && existing.upstream !== upstream.name) {
          throw new AirlockError(Code.InvalidArgument, `${path} is served by both ${existing.upstream} and ${upstream.name}`, {
            details: { field: `upstreams[${index}].services` },
          });
        }
        table.set(path, { path, service, method, upstream: upstream.name });
      }
    }
  }
  return table;
}
