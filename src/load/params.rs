//! Reaching a loaded model's parameters by their weight names (`down_blocks.1.…weight`),
//! the same dotted paths `burn-store` loads them by (enum variants skipped), so that
//! adapters can read and replace single tensors without rebuilding the model.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorPrimitive};

use crate::FusedOps;

/// The kind of layer a parameter belongs to, from the module that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `burn::nn::Linear`: its weight is stored `[in, out]`, transposed against PyTorch.
    Linear,
    /// `burn::nn::conv::Conv2d`: its weight is `[out, in, kh, kw]`, as in PyTorch.
    Conv2d,
    /// Anything else (norms, embeddings).
    Other,
}

/// One float parameter of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Shape as Burn stores it.
    pub shape: Vec<usize>,
    /// The layer holding it.
    pub kind: LayerKind,
}

/// Tracks the dotted path while a visitor or mapper walks a module, skipping enum
/// variant names as `burn-store` does (`skip_enum_variants`).
#[derive(Default)]
struct PathStack {
    names: Vec<String>,
    /// Whether each entered level added a name (enum variants do not).
    pushed: Vec<bool>,
    containers: Vec<String>,
}

impl PathStack {
    fn enter(&mut self, name: &str, container: &str) {
        let push = !container.starts_with("Enum:");
        if push {
            self.names.push(name.to_string());
        }
        self.pushed.push(push);
        self.containers.push(container.to_string());
    }

    fn exit(&mut self) {
        if self.pushed.pop() == Some(true) {
            self.names.pop();
        }
        self.containers.pop();
    }

    fn path(&self) -> String {
        self.names.join(".")
    }

    fn kind(&self) -> LayerKind {
        match self.containers.last().map(String::as_str) {
            Some("Struct:Linear") => LayerKind::Linear,
            Some("Struct:Conv2d") => LayerKind::Conv2d,
            _ => LayerKind::Other,
        }
    }
}

struct Lister {
    stack: PathStack,
    out: BTreeMap<String, ParamInfo>,
}

impl<B: FusedOps> ModuleVisitor<B> for Lister {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        // The shape without materialising a lazy parameter.
        let shape = param.lazy_shape().as_slice().to_vec();
        self.out.insert(
            self.stack.path(),
            ParamInfo {
                shape,
                kind: self.stack.kind(),
            },
        );
    }
}

/// Every float parameter of `module`, by dotted path.
pub fn list_params<B: FusedOps, M: Module<B>>(module: &M) -> BTreeMap<String, ParamInfo> {
    let mut lister = Lister {
        stack: PathStack::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut lister);
    lister.out
}

struct Reader<'a, B: FusedOps> {
    stack: PathStack,
    wanted: &'a [String],
    out: HashMap<String, TensorPrimitive<B>>,
}

impl<B: FusedOps> ModuleVisitor<B> for Reader<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let path = self.stack.path();
        if self.wanted.contains(&path) {
            self.out.insert(path, param.val().into_primitive());
        }
    }
}

/// The current values of the parameters at `paths` (those that exist), rank-erased.
/// The tensors share storage with the model's: cheap, and unchanged when the model's
/// parameter is later replaced.
pub fn read_params<B: FusedOps, M: Module<B>>(
    module: &M,
    paths: &[String],
) -> HashMap<String, TensorPrimitive<B>> {
    let mut reader = Reader {
        stack: PathStack::default(),
        wanted: paths,
        out: HashMap::new(),
    };
    module.visit(&mut reader);
    reader.out
}

struct Writer<B: FusedOps> {
    stack: PathStack,
    values: HashMap<String, TensorPrimitive<B>>,
}

impl<B: FusedOps> ModuleMapper<B> for Writer<B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.values.remove(&self.stack.path()) {
            // A lazy parameter is replaced without drawing its initial value first.
            Some(value) if !param.is_initialized() => {
                Param::initialized(param.id, Tensor::from_primitive(value))
            }
            Some(value) => {
                let (id, _old, mapper) = param.consume();
                Param::from_mapped_value(id, Tensor::from_primitive(value), mapper)
            }
            None => param,
        }
    }
}

/// Replaces the parameters named in `values` (keeping their ids); returns the module and
/// the names that matched no parameter.
pub fn write_params<B: FusedOps, M: Module<B>>(
    module: M,
    values: HashMap<String, TensorPrimitive<B>>,
) -> (M, Vec<String>) {
    let mut writer = Writer {
        stack: PathStack::default(),
        values,
    };
    let module = module.map(&mut writer);
    let mut left: Vec<String> = writer.values.into_keys().collect();
    left.sort();
    (module, left)
}
