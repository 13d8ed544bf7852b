//! The values a pickle builds: Python's scalars, strings and containers,
//! allowlisted globals, and calls recorded but never executed.

use std::cell::RefCell;
use std::rc::Rc;

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Insertion-ordered, as Python's dict and OrderedDict are.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// An allowlisted global, not yet called: `module.name`.
    Global(Rc<(String, String)>),
    /// `func(*args)`, recorded but never executed; BUILD stores `state`.
    Call(Rc<RefCell<Call>>),
    /// `persistent_load(pid)`: torch.save's reference to a storage.
    PersistentId(Rc<Value>),
}

#[derive(Debug)]
pub struct Call {
    pub module: String,
    pub name: String,
    pub args: Vec<Value>,
    pub state: Option<Value>,
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Text of a str, or of a Python 2 str (bytes read as latin-1).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            _ => None,
        }
    }

    /// Bytes of a bytes object, or of a str holding latin-1 code points (how
    /// Python 2 strs come back with `encoding="latin1"`).
    pub fn as_bytes(&self) -> Option<Rc<[u8]>> {
        match self {
            Value::Bytes(b) => Some(b.clone()),
            Value::Str(s) => {
                let v: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                v.map(Rc::from)
            }
            _ => None,
        }
    }

    /// Elements of a tuple or list.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    /// Entries of a dict (or of an `OrderedDict` call), in order.
    pub fn entries(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(d) => Some(d.borrow().clone()),
            _ => None,
        }
    }

    /// Looks up a str (or Python 2 str) key in a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.entries()?
            .into_iter()
            .find(|(k, _)| k.as_text().as_deref() == Some(key))
            .map(|(_, v)| v)
    }

    pub fn call(&self) -> Option<std::cell::Ref<'_, Call>> {
        match self {
            Value::Call(c) => Some(c.borrow()),
            _ => None,
        }
    }

    pub fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("{}.{}", g.0, g.1),
            Value::Call(c) => format!("{}.{}(...)", c.borrow().module, c.borrow().name),
            Value::PersistentId(_) => "persistent id".into(),
        }
    }
}
