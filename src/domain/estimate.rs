//! The reservation estimate of API.md: the prompt's size by the provider's tokenizer setting, plus
//! a per-message overhead, plus `n` × the completion bound.
//!
//! `bytes` is a strict upper bound for every byte-level BPE (a token is at least one byte);
//! `chars:N` is a cheap guess (one token per N characters); `o200k` and `cl100k` count exactly with
//! OpenAI's vocabularies (loaded on first use).

use super::limits::Tokenizer;

/// Tokens each chat message adds around its content (role, separators), per OpenAI's accounting.
pub const MESSAGE_OVERHEAD: u64 = 4;
/// Tokens that prime the assistant's reply.
pub const REPLY_PRIMING: u64 = 3;

/// Tokens in `text` by `tokenizer`.
pub fn count(tokenizer: Tokenizer, text: &str) -> u64 {
    match tokenizer {
        Tokenizer::Bytes => text.len() as u64,
        Tokenizer::Chars(n) => (text.chars().count() as u64).div_ceil(u64::from(n.max(1))),
        Tokenizer::O200k => bpe_openai::o200k_base().count(text) as u64,
        Tokenizer::Cl100k => bpe_openai::cl100k_base().count(text) as u64,
    }
}

/// The prompt of a chat request: its `content` tokens (every text part, counted with
/// [`count`]) plus the per-message overhead.
pub fn chat_prompt(messages: usize, content: u64) -> u64 {
    content
        .saturating_add(MESSAGE_OVERHEAD.saturating_mul(messages as u64))
        .saturating_add(REPLY_PRIMING)
}

/// What a request reserves: its prompt plus `choices` × the completion bound.
pub fn reservation(prompt: u64, choices: u64, completion_bound: u64) -> u64 {
    prompt.saturating_add(choices.max(1).saturating_mul(completion_bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tokenizer_counts_as_documented() {
        let text = "Hello, world! Ciao, mondo è bello.";
        assert_eq!(count(Tokenizer::Bytes, text), text.len() as u64);
        assert_eq!(
            count(Tokenizer::Chars(3), text),
            12,
            "34 characters / 3, rounded up"
        );
        let o200k = count(Tokenizer::O200k, text);
        let cl100k = count(Tokenizer::Cl100k, text);
        assert!(o200k > 5 && o200k < 20, "{o200k}");
        assert!(cl100k > 5 && cl100k < 20, "{cl100k}");
        assert!(
            count(Tokenizer::Bytes, text) >= o200k.max(cl100k),
            "bytes bound every BPE"
        );
    }

    #[test]
    fn a_chat_estimate_adds_overheads_and_every_choice() {
        let content = count(Tokenizer::Bytes, "abcd") + count(Tokenizer::Bytes, "ef");
        let prompt = chat_prompt(2, content);
        assert_eq!(prompt, 6 + 2 * MESSAGE_OVERHEAD + REPLY_PRIMING);
        assert_eq!(reservation(prompt, 2, 100), prompt + 200);
        assert_eq!(
            reservation(prompt, 0, 100),
            prompt + 100,
            "n = 0 means one choice"
        );
    }
}
