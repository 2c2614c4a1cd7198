// The JavaScript engine: a verified bundle's tokenizer, target (and draft) runners with their fixed-size KV buffers,
// the n-gram table, and the generation loop (runtime/engine.py's ChatSession.iterate, greedy only). `deps` holds
// the libraries: {ort (onnxruntime-web or onnxruntime-node), Tokenizer, Template}.

import {BundleError, openBundle} from "./bundle.js";
import {DECODERS, DecodeStats, MODES, modeSettings} from "./decode.js";
import {ContextFullError, ModelRunner} from "./model.js";
import {NgramModel} from "./ngram.js";
import {readNpy} from "./npy.js";
import {checkPassSizes} from "./selfcheck.js";
import {BundleTokenizer, PromptError} from "./tokenizer.js";

export {BundleError, MODES, PromptError};

const basename = (rel) => rel.split("/").at(-1);

async function openSession(ort, files, graph, sessionOptions) {
  const options = {graphOptimizationLevel: "all", logSeverityLevel: 3, ...sessionOptions};
  if (graph.data_file) options.externalData = [{path: basename(graph.data_file), data: files[graph.data_file]}];
  return ort.InferenceSession.create(files[graph.file], options);
}

export class Engine {
  constructor(manifest, tokenizer, target, draft, ngram, passCheck, loadMs) {
    this.manifest = manifest;
    this.tokenizer = tokenizer;
    this.target = target;
    this.draft = draft;
    this.ngram = ngram;
    this.passCheck = passCheck;
    this.loadMs = loadMs;
    this.maxContext = manifest.max_context;
  }

  // Verifies and opens a bundle. `sessionOptions` go to onnxruntime (e.g. executionProviders); `onFile` reports
  // each file as it is read; `onStage(text)` each step after the reads. `passCheck` is a verdict of an earlier
  // load of the same target graph on the same machine and backend (the caller keys it), applied instead of checking.
  static async load(deps, source, {sessionOptions = {}, withDraft = true, onFile, onStage = () => {},
    passCheck = null} = {}) {
    const t0 = performance.now();
    const {manifest, files} = await openBundle(source, {withDraft, onFile});
    const {ort, Tokenizer, Template} = deps;
    const target = manifest.models.target;
    const text = new TextDecoder().decode(files[manifest.tokenizer.file]);
    const tokenizer = new BundleTokenizer({Tokenizer, Template}, JSON.parse(text), manifest.tokenizer,
      target.spec.vocab_size);
    onStage("opening the target graph");
    const targetRunner = new ModelRunner(ort, await openSession(ort, files, target.graphs.fused, sessionOptions),
      {role: "target", ...target}, manifest.max_context);
    let draftRunner = null;
    const draft = withDraft ? manifest.models.draft : null;
    if (draft) {
      if (draft.spec.vocab_size !== target.spec.vocab_size) {
        throw new BundleError("the draft's vocabulary differs from the target's: speculation needs one tokenizer");
      }
      onStage("opening the draft graph");
      const headIds = draft.head_ids ? readNpy(files[draft.head_ids], draft.head_ids).data : null;
      draftRunner = new ModelRunner(ort, await openSession(ort, files, draft.graphs.fused, sessionOptions),
        {role: "draft", ...draft}, manifest.max_context, {headIds});
    }
    const ngram = manifest.ngram ? await NgramModel.fromNpz(files[manifest.ngram.file]) : null;
    let verdict;
    if (target.graphs.fused.pass_size_invariant === false) {
      verdict = {inputRows: 1, exact: false, mismatched: {}, ms: 0, why: "an --ar-only target"};
    } else if (passCheck) {
      verdict = {...passCheck, cached: true};
      targetRunner.inputRows = verdict.inputRows;
    } else {
      onStage("checking that the target's rows do not depend on the pass size");
      verdict = await checkPassSizes(targetRunner);
    }
    return new Engine(manifest, tokenizer, targetRunner, draftRunner, ngram, verdict, performance.now() - t0);
  }

  get modes() {
    return Object.fromEntries(Object.entries(MODES).filter(([, m]) => !m.draft || this.draft)
      .map(([name, m]) => [name, m.help]));
  }

  promptTokens(prompt, chat) {
    if (Array.isArray(prompt)) return this.tokenizer.encodeChat(prompt);
    if (typeof prompt !== "string" || !prompt.trim()) throw new PromptError("the prompt is empty");
    return chat ? this.tokenizer.encodeChat([{role: "user", content: prompt}]) : this.tokenizer.encode(prompt);
  }

  // Generates greedily; yields after each step {pieces: [{id, text, origin}], stats} and returns the result
  // {text, tokenIds, finishReason, message, stats}. `shouldStop()` is asked between steps.
  async* generate(prompt, {mode = "ar", maxNewTokens = 256, chat = false, settings = {}, shouldStop = () => false} = {}) {
    const tokens = this.promptTokens(prompt, chat);
    const chosen = modeSettings(mode, settings);
    if (MODES[mode].draft && !this.draft) throw new PromptError(`mode ${mode} needs a bundle with a draft model`);
    if (mode !== "ar" && !this.passCheck.exact) {
      throw new PromptError(`mode ${mode} cannot reproduce ar here: the target computes rows apart in passes of `
        + "different sizes on this backend; use ar");
    }
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new PromptError("maxNewTokens must be a positive integer");
    if (!tokens.length) throw new PromptError("the prompt encodes to no tokens");
    if (tokens.length >= this.maxContext) {
      throw new PromptError(`the prompt has ${tokens.length} tokens but the context holds ${this.maxContext}`);
    }
    const promptLength = tokens.length;
    const state = {target: this.target, draft: this.draft, tokens, ngram: this.ngram, settings: chosen,
      stats: new DecodeStats()};
    const passes = {target: this.target.stats.passes, draft: this.draft?.stats.passes ?? 0,
      runMs: this.target.stats.ms + (this.draft?.stats.ms ?? 0)};
    const text = this.tokenizer.stream();
    const newIds = [];
    let answer = "";
    let finishReason = "length";
    let message = "";
    const start = performance.now();
    let firstStep = null;
    const stats = () => this.stats(mode, state, passes, start, firstStep, promptLength, newIds.length);
    const decoder = DECODERS[mode](state);
    try {
      while (finishReason === "length" && !message && newIds.length < maxNewTokens && !shouldStop()) {
        let step;
        try {
          step = (await decoder.next()).value;
        } catch (error) {
          if (!(error instanceof ContextFullError)) throw error;
          message = `context full: the bundle holds ${this.maxContext} tokens`;
          break;
        }
        firstStep ??= performance.now();
        const pieces = [];
        for (const [i, id] of step.tokens.entries()) {
          if (tokens.length >= this.maxContext) {
            message = `context full: the bundle holds ${this.maxContext} tokens`;
            break;
          }
          newIds.push(id);
          tokens.push(id);
          const piece = text.step(id);
          answer += piece;
          pieces.push({id, text: piece, origin: step.origins[i]});
          if (this.tokenizer.eosIds.has(id)) {
            finishReason = "stop";
            break;
          }
          if (newIds.length >= maxNewTokens) break;
        }
        yield {pieces, stats: stats()};
      }
    } finally {
      await decoder.return();
    }
    if (shouldStop() && finishReason === "length") finishReason = "stopped";
    return {text: answer, tokenIds: newIds, finishReason, message, stats: stats()};
  }

  stats(mode, state, passes, start, firstStep, promptLength, n) {
    const now = performance.now();
    const s = state.stats;
    const targetPasses = this.target.stats.passes - passes.target;
    const runMs = this.target.stats.ms + (this.draft?.stats.ms ?? 0) - passes.runMs;
    return {
      mode, prompt_tokens: promptLength, new_tokens: n, seconds: (now - start) / 1000,
      time_to_first_step: firstStep === null ? null : (firstStep - start) / 1000,
      tokens_per_second: now > start ? n / ((now - start) / 1000) : 0,
      target_passes: targetPasses, draft_passes: (this.draft?.stats.passes ?? 0) - passes.draft,
      drafted: s.drafted, accepted: s.accepted, acceptance_rate: s.drafted ? s.accepted / s.drafted : null,
      tokens_per_target_pass: s.steps ? n / s.steps : null, steps_by_kind: {...s.kinds},
      run_seconds: runMs / 1000, loop_seconds: (now - start - runMs) / 1000,
      kv_buffer_bytes: this.target.kvBytes + (this.draft?.kvBytes ?? 0),
    };
  }
}
