//! Every implementation of a DataFusion trait, in one place because those APIs change between
//! releases (DataFusion is pinned): the session, the functions stages call (LLM functions as
//! async UDFs, parsers and prepare helpers as scalar UDFs), the windowed operator that runs
//! LLM calls, and the `documents` table.

pub mod args;
pub mod documents;
pub mod llm_function;
pub mod parsers;
pub mod prepare_functions;
pub mod pure;
pub mod session;
pub mod window;
