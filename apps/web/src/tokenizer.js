// The bundle's tokenizer and chat template (runtime/text.py) on @huggingface/tokenizers (tokenizer.json) and
// @huggingface/jinja (the template), the two libraries Transformers.js itself uses. Both are handed in by the
// caller (`deps`), so this module runs unchanged in node and in a browser worker.

export class PromptError extends Error {}

export class BundleTokenizer {
  constructor({Tokenizer, Template}, tokenizerJson, entry, vocabSize) {
    this.tokenizer = new Tokenizer(tokenizerJson, {
      bos_token: entry.bos_token, eos_token: entry.eos_token, clean_up_tokenization_spaces: false,
      ...(entry.special_tokens ?? {}),
    });
    if (this.tokenizer.get_vocab(true).size > vocabSize) {
      throw new Error(`the tokenizer has more tokens than the model's ${vocabSize}: a tokenizer from another model?`);
    }
    this.template = entry.chat_template ? new Template(entry.chat_template) : null;
    this.bosToken = entry.bos_token ?? null;
    this.eosToken = entry.eos_token ?? null;
    this.eosIds = new Set(entry.eos_token_ids ?? []);
    this.addBos = Boolean(entry.add_bos);
    this.specials = (tokenizerJson.added_tokens ?? []).filter((t) => t.special).map((t) => t.content);
  }

  renderChat(messages) {
    if (!this.template) throw new PromptError("this bundle has no chat template");
    return this.template.render({messages, add_generation_prompt: true, bos_token: this.bosToken ?? "",
      eos_token: this.eosToken ?? ""});
  }

  // Token ids of the chat template over `messages`. A message holding a special token's text is refused: the
  // Python runtime keeps such text as text, which this tokenizer library has no switch for.
  encodeChat(messages) {
    for (const m of messages) {
      const special = this.specials.find((s) => m.content.includes(s));
      if (special) throw new PromptError(`a message holds the special token ${special}; write it differently`);
    }
    return this.withBos(this.tokenizer.encode(this.renderChat(messages), {add_special_tokens: false}).ids);
  }

  encode(text) {
    return this.withBos(this.tokenizer.encode(text, {add_special_tokens: false}).ids);
  }

  withBos(ids) {
    if (this.addBos && this.bosToken) {
      const bos = this.tokenizer.token_to_id(this.bosToken);
      if (bos !== undefined && ids[0] !== bos) return [bos, ...ids];
    }
    return ids;
  }

  decode(ids) {
    return this.tokenizer.decode(ids, {skip_special_tokens: true});
  }

  stream() {
    return new TextStream(this);
  }
}

// Streaming detokenization that emits text only once a character is complete (tokenizers' DecodeStream): each
// step decodes the ids since the last complete piece and returns what is new, or "" while a byte sequence is open.
export class TextStream {
  constructor(tokenizer) {
    this.tokenizer = tokenizer;
    this.ids = [];
    this.prefix = "";
    this.prefixIndex = 0;
  }

  step(id) {
    this.ids.push(id);
    const text = this.tokenizer.decode(this.ids);
    if (text.length <= this.prefix.length || text.endsWith("\uFFFD")) return "";
    const piece = text.slice(this.prefix.length);
    const keep = this.ids.length - this.prefixIndex;
    this.ids = this.ids.slice(this.prefixIndex);
    this.prefix = this.tokenizer.decode(this.ids);
    this.prefixIndex = keep;
    return piece;
  }
}
