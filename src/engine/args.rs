//! Reading and checking UDF arguments.

use datafusion::arrow::array::{Array, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::ColumnarValue;

/// The arguments as string arrays of `n` rows (scalars repeated).
pub fn string_columns(args: &[ColumnarValue], n: usize) -> Result<Vec<StringArray>> {
    args.iter()
        .map(|a| {
            let array = cast(&a.to_array(n)?, &DataType::Utf8)?;
            Ok(array
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8 gives a StringArray")
                .clone())
        })
        .collect()
}

/// Argument `i` as an Int64 array of `n` rows, if it was given.
pub fn int_column(args: &[ColumnarValue], i: usize, n: usize) -> Result<Option<Int64Array>> {
    let Some(arg) = args.get(i) else {
        return Ok(None);
    };
    let array = cast(&arg.to_array(n)?, &DataType::Int64)?;
    Ok(Some(
        array
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("cast to Int64 gives an Int64Array")
            .clone(),
    ))
}

/// Accepts any string type (or NULL) for each of `params`, as Utf8.
pub fn coerce_strings(
    name: &str,
    params: &[&str],
    arg_types: &[DataType],
) -> Result<Vec<DataType>> {
    if arg_types.len() != params.len() {
        return plan_err!(
            "{name}({}) takes {} argument(s), got {}",
            params.join(", "),
            params.len(),
            arg_types.len()
        );
    }
    arg_types
        .iter()
        .zip(params)
        .map(|(t, p)| match t {
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null => {
                Ok(DataType::Utf8)
            }
            other => plan_err!("{name}: argument {p} must be a string, got {other}"),
        })
        .collect()
}

/// Argument `i` (`name`) of `function`, which must be a constant.
pub fn scalar_arg(
    args: &[ColumnarValue],
    i: usize,
    function: &str,
    name: &str,
) -> Result<ScalarValue> {
    match &args[i] {
        ColumnarValue::Scalar(s) => Ok(s.clone()),
        ColumnarValue::Array(_) => exec_err!("{function}: {name} must be a constant"),
    }
}

/// Argument `i` (`name`) of `function`, which must be a non-negative integer constant.
pub fn count_arg(args: &[ColumnarValue], i: usize, function: &str, name: &str) -> Result<usize> {
    match scalar_arg(args, i, function, name)? {
        ScalarValue::Int64(Some(v)) if v >= 0 => Ok(v as usize),
        other => exec_err!("{function}: {name} must be a non-negative integer, got {other}"),
    }
}
