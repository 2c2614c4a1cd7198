// A bundle as the JavaScript loop reads it (runtime/bundle.py): manifest.json, then every file it needs, each
// checked against the sha256 the manifest records before anything parses it. Files come from a `source`:
// `read(rel, onBytes)` resolves to a Uint8Array (fetch and the Cache API in the browser, the file system in node).

export class BundleError extends Error {}

export const SCHEMA_VERSION = 1;

export async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// `rel` if it names a path inside the bundle folder.
function inside(rel, what) {
  if (typeof rel !== "string" || !rel) throw new BundleError(`${what} must be a path in the bundle, got ${rel}`);
  if (rel.startsWith("/") || /^[a-zA-Z]:/.test(rel) || rel.split(/[\\/]/).includes("..")) {
    throw new BundleError(`${what} ${JSON.stringify(rel)} points outside the bundle folder`);
  }
  return rel;
}

function checkManifest(raw) {
  if (!raw || typeof raw !== "object" || Array.isArray(raw)) throw new BundleError("manifest.json must hold a JSON object");
  const version = raw.schema_version;
  if (!Number.isInteger(version)) throw new BundleError("manifest.json has no integer schema_version");
  if (version > SCHEMA_VERSION || version < 1) {
    throw new BundleError(`bundle schema version ${version} is not one this loop reads (${SCHEMA_VERSION})`);
  }
  if (!Number.isInteger(raw.max_context) || raw.max_context < 2) {
    throw new BundleError(`max_context must be an integer >= 2, got ${JSON.stringify(raw.max_context)}`);
  }
  if (!raw.models?.target) throw new BundleError("manifest.json has no target model");
  if (!raw.files || typeof raw.files !== "object") throw new BundleError("manifest.json has no files");
  for (const rel of Object.keys(raw.files)) inside(rel, "a file in the manifest's files");
  return raw;
}

// The files this loop reads, by what each is: the tokenizer, each model's fused graph and its weights, a restricted
// draft head's ids, the n-gram table.
export function neededFiles(manifest, withDraft = true) {
  const named = {[manifest.tokenizer.file]: "the tokenizer"};
  for (const [role, model] of Object.entries(manifest.models)) {
    if (role === "draft" && !withDraft) continue;
    const graph = model.graphs?.fused;
    if (!graph) throw new BundleError(`the ${role} model has no fused graph (a static NPU bundle needs the Python runtime)`);
    named[graph.file] = `the ${role} graph`;
    if (graph.data_file) named[graph.data_file] = `the ${role} graph's weights`;
    if (model.head_ids) named[model.head_ids] = `the ${role}'s head token ids`;
  }
  if (manifest.ngram) named[manifest.ngram.file] = "the n-gram table";
  for (const [rel, what] of Object.entries(named)) {
    inside(rel, what);
    if (!(rel in manifest.files)) {
      throw new BundleError(`${what} ${JSON.stringify(rel)} is not in the manifest's files, so its checksum cannot `
        + "be verified; re-export the bundle");
    }
  }
  return named;
}

// {manifest, files: {rel: Uint8Array}}: every needed file, verified. `onFile({rel, index, count})` before each.
export async function openBundle(source, {withDraft = true, onFile = () => {}} = {}) {
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder("utf-8", {fatal: true}).decode(await source.read("manifest.json")));
  } catch (error) {
    throw new BundleError(`manifest.json is not valid JSON: ${error.message}`);
  }
  checkManifest(manifest);
  const named = neededFiles(manifest, withDraft);
  const files = {};
  const rels = Object.keys(named);
  for (const [index, rel] of rels.entries()) {
    onFile({rel, index, count: rels.length});
    const bytes = await source.read(rel);
    const actual = await sha256Hex(bytes);
    if (actual !== manifest.files[rel]) {
      throw new BundleError(`checksum mismatch for ${rel}: the file was changed or corrupted (expected sha256 `
        + `${manifest.files[rel].slice(0, 12)}…, got ${actual.slice(0, 12)}…)`);
    }
    files[rel] = bytes;
  }
  return {manifest, files};
}
