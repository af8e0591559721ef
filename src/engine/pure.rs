//! Pure functions (no LLM, no job settings) as scalar UDFs: each is one [`PureFunction`]
//! row — name, parameters, return type and body — wrapped by one UDF type.

use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::plan_err;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::engine::args::coerce_strings;

/// The SQL type a parameter is coerced to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// Any string type; other types are a plan error naming the parameter.
    Text(&'static str),
    /// Cast to Int64.
    Int(&'static str),
    /// Cast to Float64.
    Float(&'static str),
}

impl Param {
    fn name(self) -> &'static str {
        match self {
            Param::Text(n) | Param::Int(n) | Param::Float(n) => n,
        }
    }
}

/// One pure function: the row of the table its UDF is built from.
#[derive(Debug)]
pub struct PureFunction {
    /// SQL name.
    pub name: &'static str,
    /// Parameters in order; the last `optional` of them may be left out.
    pub params: &'static [Param],
    /// How many trailing parameters are optional.
    pub optional: usize,
    /// The result's type.
    pub returns: fn() -> DataType,
    /// The body: the arguments of a batch of `n` rows to the result column.
    pub invoke: fn(&[ColumnarValue], usize) -> Result<ArrayRef>,
}

/// The UDF of one [`PureFunction`].
#[derive(Debug)]
struct PureUdf {
    function: &'static PureFunction,
    signature: Signature,
}

impl PartialEq for PureUdf {
    fn eq(&self, other: &Self) -> bool {
        self.function.name == other.function.name
    }
}

impl Eq for PureUdf {}

impl std::hash::Hash for PureUdf {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.function.name.hash(state);
    }
}

/// The UDF of `function`.
pub fn pure_udf(function: &'static PureFunction) -> ScalarUDF {
    ScalarUDF::new_from_impl(PureUdf {
        function,
        signature: Signature::user_defined(Volatility::Immutable),
    })
}

impl ScalarUDFImpl for PureUdf {
    fn name(&self) -> &str {
        self.function.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let f = self.function;
        let required = f.params.len() - f.optional;
        if arg_types.len() < required || arg_types.len() > f.params.len() {
            let all: Vec<&str> = f.params.iter().map(|p| p.name()).collect();
            return plan_err!(
                "{}({}) got {} argument(s)",
                f.name,
                all.join(", "),
                arg_types.len()
            );
        }
        f.params
            .iter()
            .zip(arg_types)
            .map(|(param, given)| match param {
                Param::Text(name) => {
                    Ok(coerce_strings(f.name, &[name], std::slice::from_ref(given))?.remove(0))
                }
                Param::Int(_) => Ok(DataType::Int64),
                Param::Float(_) => Ok(DataType::Float64),
            })
            .collect()
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok((self.function.returns)())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = (self.function.invoke)(&args.args, args.number_rows)?;
        Ok(ColumnarValue::Array(Arc::clone(&array)))
    }
}
