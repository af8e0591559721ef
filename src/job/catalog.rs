//! The built-in stages and LLM functions. A built-in stage is one SQL file under `sql/` and
//! one [`BuiltinStage`] here; a built-in LLM function is one prompt under `src/job/prompts/`
//! and one [`BuiltinFunction`] here. Nothing else lists them: resolving a job copies what a
//! job uses into its stage and function specs (the mock's answer included), and `stats` reads
//! the stage order.

use std::sync::LazyLock;

/// The table a job's input documents are read as.
pub const DOCUMENTS: &str = "documents";
/// The table of near-duplicates (`id`, `kept_id`, `similarity`) the runner computes from the
/// `minhash` signatures of the other table a stage reads (see `sql/deduped.sql`).
pub const NEAR_DUPLICATES: &str = "near_duplicates";

/// A built-in stage.
#[derive(Debug, Clone)]
pub struct BuiltinStage {
    /// Stage and table name.
    pub name: &'static str,
    /// The table it reads unless the job says otherwise (`{{ stage.from }}` in its SQL).
    pub from: &'static str,
    /// Verbs users may type for it (`--stages prepare`).
    pub aliases: &'static [&'static str],
    /// Whether a job without `[[stages]]` runs it (the paper's pipeline).
    pub default: bool,
    /// Its SQL template.
    pub sql: &'static str,
}

/// The built-in stages in pipeline order: BaF's (the defaults, and `distilled`), Humpback's
/// second scoring iteration, Kun's judgement, polishing and post-filters, near-dedup.
const STAGES: &[BuiltinStage] = &[
    BuiltinStage {
        name: "candidates",
        from: DOCUMENTS,
        aliases: &["prepare"],
        default: true,
        sql: include_str!("../../sql/candidates.sql"),
    },
    BuiltinStage {
        name: "decontaminated",
        from: "candidates",
        aliases: &["decontaminate"],
        default: false,
        sql: include_str!("../../sql/decontaminated.sql"),
    },
    BuiltinStage {
        name: "deduped",
        from: "candidates",
        aliases: &[],
        default: false,
        sql: include_str!("../../sql/deduped.sql"),
    },
    BuiltinStage {
        name: "backtranslated",
        from: "candidates",
        aliases: &["backtranslate"],
        default: true,
        sql: include_str!("../../sql/backtranslated.sql"),
    },
    BuiltinStage {
        name: "judged",
        from: "backtranslated",
        aliases: &[],
        default: false,
        sql: include_str!("../../sql/judged.sql"),
    },
    BuiltinStage {
        name: "scored",
        from: "backtranslated",
        aliases: &["score"],
        default: true,
        sql: include_str!("../../sql/scored.sql"),
    },
    BuiltinStage {
        name: "rescored",
        from: "scored",
        aliases: &[],
        default: false,
        sql: include_str!("../../sql/rescored.sql"),
    },
    BuiltinStage {
        name: "curated",
        from: "scored",
        aliases: &["curate"],
        default: true,
        sql: include_str!("../../sql/curated.sql"),
    },
    BuiltinStage {
        name: "rewritten",
        from: "curated",
        aliases: &["rewrite"],
        default: true,
        sql: include_str!("../../sql/rewritten.sql"),
    },
    BuiltinStage {
        name: "polished",
        from: "judged",
        aliases: &[],
        default: false,
        sql: include_str!("../../sql/polished.sql"),
    },
    BuiltinStage {
        name: "distilled",
        from: "curated",
        aliases: &["distill"],
        default: false,
        sql: include_str!("../../sql/distilled.sql"),
    },
    BuiltinStage {
        name: "filtered",
        from: "rewritten",
        aliases: &[],
        default: false,
        sql: include_str!("../../sql/filtered.sql"),
    },
];

/// How many output tokens `estimate` expects of a call before the model has answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpectedOutput {
    /// A length of its own, which `[params] <param>` may change (the papers' figure by default).
    Tokens {
        /// The `[params]` key that sets it.
        param: &'static str,
        /// The papers' figure.
        default: f64,
    },
    /// A multiple of the candidate text's length.
    TimesText(f64),
}

/// What the mock is answering: the prompt, its last labelled block (the document or draft)
/// and a hash of it, so answers are deterministic.
#[derive(Debug, Clone, Copy)]
pub struct MockPrompt<'a> {
    /// The rendered prompt.
    pub prompt: &'a str,
    /// The prompt's last labelled block, or the whole prompt.
    pub tail: &'a str,
    /// A hash of the prompt (and of the sample).
    pub hash: u64,
    /// Which sample of the prompt is asked (0 for the first, or the only one).
    pub sample: u32,
}

/// A built-in LLM function.
#[derive(Debug, Clone)]
pub struct BuiltinFunction {
    /// SQL name.
    pub name: &'static str,
    /// Argument names, which are also the template's variables.
    pub args: &'static [&'static str],
    /// Model role called unless the job says otherwise.
    pub role: &'static str,
    /// Prompt template.
    pub template: &'static str,
    /// Output tokens its role may generate unless the job says otherwise.
    pub max_tokens: u32,
    /// Output tokens `estimate` expects per call.
    pub expected_output: ExpectedOutput,
    /// Whether it scores pairs on the 5-point rubric, and so accepts `mode = "logprobs"`.
    pub scores: bool,
    /// The offline mock's answer, in the shape its parser reads.
    pub mock: MockAnswer,
}

/// How the offline mock answers a function: in the shape the function's parser reads.
#[derive(Clone, Copy)]
pub struct MockAnswer(pub fn(MockPrompt<'_>) -> String);

impl std::fmt::Debug for MockAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockAnswer")
    }
}

impl PartialEq for MockAnswer {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::fn_addr_eq(self.0, other.0)
    }
}

impl Default for MockAnswer {
    fn default() -> Self {
        MockAnswer(mock_answer)
    }
}

/// The text-mode template of the scoring functions.
pub const SCORE_TEMPLATE: &str = include_str!("prompts/score_pair.txt");
/// The template of the scoring functions in `mode = "logprobs"`: the score as one token.
pub const SCORE_LOGPROBS_TEMPLATE: &str = include_str!("prompts/score_pair_logprobs.txt");
/// The template of the scoring functions in `mode = "json"`: `{reason, score}`.
pub const SCORE_JSON_TEMPLATE: &str = include_str!("prompts/score_pair_json.txt");

/// An instruction's length, in tokens.
pub const INSTRUCTION_TOKENS: ExpectedOutput = ExpectedOutput::Tokens {
    param: "estimate_instruction_tokens",
    default: 69.0, // BaF, Table 6
};
const JUDGEMENT_TOKENS: ExpectedOutput = ExpectedOutput::Tokens {
    param: "estimate_judgement_tokens",
    default: 120.0,
};

/// The built-in LLM functions. `rescore` is `score_pair` for Humpback's second iteration,
/// asking a second model (`scorer_m1`); `judge_instruction` and `polish` are Kun's steps.
/// Expected lengths are BaF's: rewrites 0.94 and answers 1.14 times the web text (468 and 567
/// vs 499 tokens).
const FUNCTIONS: &[BuiltinFunction] = &[
    BuiltinFunction {
        name: "backtranslate",
        args: &["text"],
        role: "backward",
        template: include_str!("prompts/backtranslate.txt"),
        max_tokens: 256,
        expected_output: INSTRUCTION_TOKENS,
        scores: false,
        mock: MockAnswer(|p| {
            let topic: Vec<&str> = p.tail.split_whitespace().take(6).collect();
            format!(
                "Can you explain {}?",
                topic.join(" ").trim_end_matches(['.', ',', ':'])
            )
        }),
    },
    BuiltinFunction {
        name: "score_pair",
        args: &["instruction", "response"],
        role: "scorer",
        template: SCORE_TEMPLATE,
        max_tokens: 512,
        expected_output: JUDGEMENT_TOKENS,
        scores: true,
        mock: MockAnswer(|p| mock_judgement(p.hash)),
    },
    BuiltinFunction {
        name: "rescore",
        args: &["instruction", "response"],
        role: "scorer_m1",
        template: SCORE_TEMPLATE,
        max_tokens: 512,
        expected_output: JUDGEMENT_TOKENS,
        scores: true,
        // A second-iteration judge that does not simply echo the first.
        mock: MockAnswer(|p| mock_judgement(p.hash >> 20)),
    },
    BuiltinFunction {
        name: "rewrite",
        args: &["instruction", "draft"],
        role: "rewriter",
        template: include_str!("prompts/rewrite.txt"),
        max_tokens: 2048,
        expected_output: ExpectedOutput::TimesText(0.94),
        scores: false,
        // Later samples of one prompt drop more of the draft's end, so they differ.
        mock: MockAnswer(|p| {
            if p.sample == 0 {
                return format!("[RES]\n{}\n[/RES]", p.tail.trim());
            }
            let words: Vec<&str> = p.tail.split_whitespace().collect();
            let keep = words.len() - words.len() * (p.sample as usize % 8) / 8;
            format!("[RES]\n{}\n[/RES]", words[..keep].join(" "))
        }),
    },
    BuiltinFunction {
        name: "answer",
        args: &["instruction"],
        role: "rewriter",
        template: include_str!("prompts/answer.txt"),
        max_tokens: 2048,
        expected_output: ExpectedOutput::TimesText(1.14),
        scores: false,
        mock: MockAnswer(mock_answer),
    },
    BuiltinFunction {
        name: "judge_instruction",
        args: &["instruction"],
        role: "scorer",
        template: include_str!("prompts/judge_instruction.txt"),
        max_tokens: 512,
        expected_output: JUDGEMENT_TOKENS,
        scores: false,
        mock: MockAnswer(|p| match p.hash % 6 {
            0 => "The instruction depends on details it does not give.\nVerdict: bad".into(),
            _ => "The instruction is clear and can be answered.\nVerdict: good".into(),
        }),
    },
    BuiltinFunction {
        name: "polish",
        args: &["instruction", "draft"],
        role: "rewriter",
        template: include_str!("prompts/polish.txt"),
        max_tokens: 2048,
        expected_output: ExpectedOutput::TimesText(1.14),
        scores: false,
        // Now and then the failures Kun's post-filters are there for.
        mock: MockAnswer(|p| {
            let reference = p.prompt.split("\n\n").nth(1).unwrap_or(p.tail).trim();
            match p.hash % 10 {
                0 => "I'm sorry, but I cannot help with that.".to_string(),
                1 => format!("According to the text, {reference}"),
                _ => reference.to_string(),
            }
        }),
    },
];

/// Roughly the shape of real judges: mostly 3-4, a fifth 5, some unparseable.
fn mock_judgement(hash: u64) -> String {
    let score = match hash % 20 {
        0 => return "I am not able to judge this pair.".to_string(),
        1..=4 => 5,
        5..=9 => 4,
        10..=14 => 3,
        15..=17 => 2,
        _ => 1,
    };
    format!("The answer addresses the instruction.\nScore: {score}")
}

/// The mock's answer to a function written out in the job.
pub fn mock_answer(p: MockPrompt<'_>) -> String {
    format!("Here is a short answer.\n\n{}", p.tail.trim())
}

/// The stages and functions a job may use by name alone.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Stages in pipeline order.
    pub stages: Vec<BuiltinStage>,
    /// LLM functions.
    pub functions: Vec<BuiltinFunction>,
}

static BUILTIN: LazyLock<Catalog> = LazyLock::new(|| Catalog {
    stages: STAGES.to_vec(),
    functions: FUNCTIONS.to_vec(),
});

impl Catalog {
    /// backforth's own stages and functions.
    pub fn builtin() -> &'static Catalog {
        &BUILTIN
    }

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&BuiltinStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The function called `name`.
    pub fn function(&self, name: &str) -> Option<&BuiltinFunction> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// The output cap of a model role unless the job sets one: the largest of the functions
    /// it serves (instructions are short, judgements carry reasoning, rewrites are as long as
    /// the documents they rewrite); 2048 for a role of the job's own.
    pub fn default_max_tokens(&self, role: &str) -> u32 {
        self.functions
            .iter()
            .filter(|f| f.role == role)
            .map(|f| f.max_tokens)
            .max()
            .unwrap_or(2048)
    }
}
