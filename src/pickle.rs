//! A safe reader for Python pickles (protocols 0-5, the opcodes that
//! `pickle`, numpy and `torch.save` emit).
//!
//! A pickle is a program that may import and call any Python callable. This
//! reader never calls anything: a `GLOBAL` is accepted only if the caller's
//! allowlist names it (anything else, such as `os.system`, is refused with an
//! error naming it), and calls of allowed globals become inert
//! [`Value::Call`] nodes that the caller interprets. Every length read from
//! the input is checked against the bytes that remain, and shared objects are
//! reference-counted, so a hostile file cannot make it allocate much more than
//! its own size.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{Result, anyhow, bail};

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

/// What a pickle may reference: `(module, name)` pairs. Globals listed in
/// `dict_like` are constructors of an empty dict (OrderedDict) and become a
/// [`Value::Dict`] when called, so SETITEMS can fill them.
pub struct Allowlist<'a> {
    pub globals: &'a [(&'a str, &'a str)],
    pub dict_like: &'a [(&'a str, &'a str)],
}

/// `_codecs.encode(text, "latin1")` is how Python 3 pickles bytes under
/// protocol 2; it is evaluated (it only makes bytes), never called.
const CODECS_ENCODE: (&str, &str) = ("_codecs", "encode");

enum Item {
    Value(Value),
    Mark,
}

pub struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    allow: &'a Allowlist<'a>,
}

impl<'a> Unpickler<'a> {
    pub fn new(data: &'a [u8], allow: &'a Allowlist<'a>) -> Self {
        Unpickler {
            data,
            pos: 0,
            allow,
        }
    }

    /// Bytes consumed so far (legacy torch.save files hold several pickles
    /// and raw data one after the other).
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                anyhow!(
                    "pickle truncated: needs {n} bytes at offset {}, only {} left",
                    self.pos,
                    self.data.len() - self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?) as usize)
    }

    fn u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?) as usize)
    }

    fn u64(&mut self) -> Result<usize> {
        let v = u64::from_le_bytes(self.take(8)?.try_into()?);
        usize::try_from(v).map_err(|_| anyhow!("pickle length {v} is too large"))
    }

    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("pickle truncated: unterminated line at offset {}", self.pos))?;
        let s = &rest[..n];
        self.pos += n + 1;
        Ok(s)
    }

    fn text_line(&mut self) -> Result<String> {
        Ok(String::from_utf8_lossy(self.line()?).into_owned())
    }

    fn global(&self, module: &str, name: &str) -> Result<Value> {
        let pair = (module, name);
        if pair == CODECS_ENCODE
            || self.allow.globals.contains(&pair)
            || self.allow.dict_like.contains(&pair)
        {
            Ok(Value::Global(Rc::new((
                module.to_string(),
                name.to_string(),
            ))))
        } else {
            bail!("refusing to load the Python global {module}.{name}: it is not on the allowlist")
        }
    }

    /// Runs the pickle to its STOP opcode and returns the object it built.
    pub fn load(&mut self) -> Result<Value> {
        let mut stack: Vec<Item> = Vec::new();
        let mut memo: HashMap<usize, Value> = HashMap::new();
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("unsupported pickle protocol {proto}");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint
                }
                b'.' => {
                    return match stack.pop() {
                        Some(Item::Value(v)) => Ok(v),
                        _ => bail!("pickle ends with an empty stack"),
                    };
                }
                b'(' => stack.push(Item::Mark),
                b'N' => push(&mut stack, Value::None),
                0x88 => push(&mut stack, Value::Bool(true)),
                0x89 => push(&mut stack, Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into()?);
                    push(&mut stack, Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    push(&mut stack, Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    push(&mut stack, Value::Int(v as i64))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()?
                    };
                    let bytes = self.take(n)?;
                    push(&mut stack, Value::Int(long_from_le(bytes)?))
                }
                b'I' | b'L' => {
                    let line = self.text_line()?;
                    let t = line.trim_end_matches('L');
                    let v = match t {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(t.parse().map_err(|_| anyhow!("bad integer {line:?}"))?),
                    };
                    push(&mut stack, v)
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into()?);
                    push(&mut stack, Value::Float(v))
                }
                b'F' => {
                    let line = self.text_line()?;
                    push(
                        &mut stack,
                        Value::Float(line.parse().map_err(|_| anyhow!("bad float"))?),
                    )
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()?,
                        0x8c => self.u8()? as usize,
                        _ => self.u64()?,
                    };
                    let s = std::str::from_utf8(self.take(n)?)
                        .map_err(|_| anyhow!("invalid UTF-8 in a pickled str at offset {at}"))?;
                    push(&mut stack, Value::Str(Rc::from(s)))
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e => {
                    // Python 2 str (T, U) and bytes (B, C, 8e): raw bytes.
                    let n = match op {
                        b'T' | b'B' => self.u32()?,
                        b'U' | b'C' => self.u8()? as usize,
                        _ => self.u64()?,
                    };
                    push(&mut stack, Value::Bytes(Rc::from(self.take(n)?)))
                }
                b'V' => {
                    let line = self.text_line()?;
                    push(&mut stack, Value::Str(Rc::from(line.as_str())))
                }
                b'S' => {
                    let line = self.text_line()?;
                    let t = line.trim_matches(|c| c == '\'' || c == '"');
                    push(&mut stack, Value::Bytes(Rc::from(t.as_bytes())))
                }
                b'}' => push(&mut stack, Value::Dict(Rc::default())),
                b']' => push(&mut stack, Value::List(Rc::default())),
                b')' => push(&mut stack, Value::Tuple(Rc::default())),
                b'd' => {
                    let items = pop_mark(&mut stack)?;
                    push(
                        &mut stack,
                        Value::Dict(Rc::new(RefCell::new(pairs(items)?))),
                    )
                }
                b'l' => {
                    let items = pop_mark(&mut stack)?;
                    push(&mut stack, Value::List(Rc::new(RefCell::new(items))))
                }
                b't' => {
                    let items = pop_mark(&mut stack)?;
                    push(&mut stack, Value::Tuple(Rc::new(items)))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(pop(&mut stack)?);
                    }
                    items.reverse();
                    push(&mut stack, Value::Tuple(Rc::new(items)))
                }
                b's' => {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    dict_extend(top(&stack)?, vec![(k, v)])?;
                }
                b'u' => {
                    let items = pop_mark(&mut stack)?;
                    dict_extend(top(&stack)?, pairs(items)?)?;
                }
                b'a' => {
                    let v = pop(&mut stack)?;
                    list_extend(top(&stack)?, vec![v])?;
                }
                b'e' => {
                    let items = pop_mark(&mut stack)?;
                    list_extend(top(&stack)?, items)?;
                }
                b'q' | b'r' | b'p' => {
                    let idx = match op {
                        b'q' => self.u8()? as usize,
                        b'r' => self.u32()?,
                        _ => self
                            .text_line()?
                            .parse()
                            .map_err(|_| anyhow!("bad PUT index"))?,
                    };
                    memo.insert(idx, top(&stack)?.clone());
                }
                0x94 => {
                    let idx = memo.len();
                    memo.insert(idx, top(&stack)?.clone());
                }
                b'h' | b'j' | b'g' => {
                    let idx = match op {
                        b'h' => self.u8()? as usize,
                        b'j' => self.u32()?,
                        _ => self
                            .text_line()?
                            .parse()
                            .map_err(|_| anyhow!("bad GET index"))?,
                    };
                    let v = memo
                        .get(&idx)
                        .ok_or_else(|| {
                            anyhow!("pickle refers to memo entry {idx}, which was never stored")
                        })?
                        .clone();
                    push(&mut stack, v)
                }
                b'c' => {
                    let module = self.text_line()?;
                    let name = self.text_line()?;
                    let g = self.global(&module, &name)?;
                    push(&mut stack, g)
                }
                0x93 => {
                    let name = pop(&mut stack)?;
                    let module = pop(&mut stack)?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        bail!("STACK_GLOBAL needs two strs at offset {at}");
                    };
                    let g = self.global(m, n)?;
                    push(&mut stack, g)
                }
                b'R' | 0x81 => {
                    let args = pop(&mut stack)?;
                    let func = pop(&mut stack)?;
                    let args = match args {
                        Value::Tuple(t) => t.as_ref().clone(),
                        other => bail!("call arguments must be a tuple, got {}", other.type_name()),
                    };
                    push(&mut stack, self.apply(func, args)?)
                }
                b'b' => {
                    let state = pop(&mut stack)?;
                    match top(&stack)? {
                        Value::Call(c) => c.borrow_mut().state = Some(state),
                        // OrderedDict's BUILD carries instance attributes
                        // (torch's `_metadata`): irrelevant here.
                        Value::Dict(_) => {}
                        other => bail!("cannot BUILD a {}", other.type_name()),
                    }
                }
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    push(&mut stack, Value::PersistentId(Rc::new(pid)))
                }
                b'P' => {
                    let line = self.text_line()?;
                    push(
                        &mut stack,
                        Value::PersistentId(Rc::new(Value::Str(Rc::from(line.as_str())))),
                    )
                }
                b'0' => {
                    stack
                        .pop()
                        .ok_or_else(|| anyhow!("POP on an empty stack"))?;
                }
                b'1' => {
                    pop_mark(&mut stack)?;
                }
                b'2' => {
                    let v = top(&stack)?.clone();
                    push(&mut stack, v)
                }
                other => bail!("unsupported pickle opcode 0x{other:02x} at offset {at}"),
            }
        }
    }

    fn apply(&self, func: Value, args: Vec<Value>) -> Result<Value> {
        let Value::Global(g) = func else {
            bail!(
                "pickle calls a {}, which is not an allowed global",
                func.type_name()
            );
        };
        let pair = (g.0.as_str(), g.1.as_str());
        if pair == CODECS_ENCODE {
            let text = match args.first() {
                Some(Value::Str(s)) => s.clone(),
                _ => bail!("_codecs.encode expects a str"),
            };
            let bytes = Value::Str(text)
                .as_bytes()
                .ok_or_else(|| anyhow!("_codecs.encode: text is not latin-1"))?;
            return Ok(Value::Bytes(bytes));
        }
        if self.allow.dict_like.contains(&pair) {
            let init = match args.first() {
                Some(v) => v
                    .items()
                    .map(pairs_from_tuples)
                    .transpose()?
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            return Ok(Value::Dict(Rc::new(RefCell::new(init))));
        }
        Ok(Value::Call(Rc::new(RefCell::new(Call {
            module: g.0.clone(),
            name: g.1.clone(),
            args,
            state: None,
        }))))
    }
}

fn long_from_le(bytes: &[u8]) -> Result<i64> {
    if bytes.is_empty() {
        return Ok(0);
    }
    if bytes.len() > 8 {
        bail!("integer of {} bytes is too large", bytes.len());
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf))
}

fn push(stack: &mut Vec<Item>, v: Value) {
    stack.push(Item::Value(v));
}

fn pop(stack: &mut Vec<Item>) -> Result<Value> {
    match stack.pop() {
        Some(Item::Value(v)) => Ok(v),
        Some(Item::Mark) => bail!("malformed pickle: unexpected MARK"),
        None => bail!("malformed pickle: stack underflow"),
    }
}

fn top(stack: &[Item]) -> Result<&Value> {
    match stack.last() {
        Some(Item::Value(v)) => Ok(v),
        _ => bail!("malformed pickle: no object on the stack"),
    }
}

fn pop_mark(stack: &mut Vec<Item>) -> Result<Vec<Value>> {
    let mut items = Vec::new();
    loop {
        match stack.pop() {
            Some(Item::Value(v)) => items.push(v),
            Some(Item::Mark) => break,
            None => bail!("malformed pickle: MARK not found"),
        }
    }
    items.reverse();
    Ok(items)
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("malformed pickle: odd number of dict items");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn pairs_from_tuples(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    items
        .into_iter()
        .map(|kv| match kv.items().as_deref() {
            Some([k, v]) => Ok((k.clone(), v.clone())),
            _ => bail!("OrderedDict items must be pairs"),
        })
        .collect()
}

fn dict_extend(target: &Value, items: Vec<(Value, Value)>) -> Result<()> {
    match target {
        Value::Dict(d) => {
            let mut d = d.borrow_mut();
            for (k, v) in items {
                // Later keys replace earlier ones, as in Python.
                let key = k.as_text();
                match d
                    .iter_mut()
                    .find(|(k2, _)| key.is_some() && k2.as_text() == key)
                {
                    Some(slot) => slot.1 = v,
                    None => d.push((k, v)),
                }
            }
            Ok(())
        }
        other => bail!("SETITEM on a {}", other.type_name()),
    }
}

fn list_extend(target: &Value, items: Vec<Value>) -> Result<()> {
    match target {
        Value::List(l) => {
            l.borrow_mut().extend(items);
            Ok(())
        }
        other => bail!("APPEND on a {}", other.type_name()),
    }
}

/// A numpy array rebuilt from its pickle (`numpy.core.multiarray._reconstruct`
/// + `__setstate__`), without numpy.
pub struct NdArray {
    /// numpy's type string, e.g. `|u1`, `<i8`, `<f4`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Rc<[u8]>,
}

/// The globals a numpy array pickle uses.
pub const NUMPY_GLOBALS: &[(&str, &str)] = &[
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
];

pub fn ndarray(v: &Value) -> Result<NdArray> {
    let call = v
        .call()
        .ok_or_else(|| anyhow!("expected a numpy array, found {}", v.type_name()))?;
    if call.name != "_reconstruct" {
        bail!(
            "expected a numpy array, found {}.{}",
            call.module,
            call.name
        );
    }
    let state = call
        .state
        .as_ref()
        .and_then(|s| s.items())
        .ok_or_else(|| anyhow!("numpy array without state"))?;
    // (version, shape, dtype, is_fortran, data)
    let [_, shape, dtype, fortran, data] = state.as_slice() else {
        bail!("numpy array state has {} fields, expected 5", state.len());
    };
    if fortran.as_int() == Some(1) {
        bail!("Fortran-ordered numpy arrays are not supported");
    }
    let shape: Vec<usize> = shape
        .items()
        .ok_or_else(|| anyhow!("numpy array shape is not a tuple"))?
        .iter()
        .map(|d| d.as_int().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow!("numpy array shape is not a tuple of sizes"))?;
    let dcall = dtype
        .call()
        .ok_or_else(|| anyhow!("numpy array without a dtype"))?;
    let code = dcall
        .args
        .first()
        .and_then(|a| a.as_text())
        .unwrap_or_default();
    let order = dcall
        .state
        .as_ref()
        .and_then(|s| s.items())
        .and_then(|s| s.get(1).and_then(|o| o.as_text()))
        .unwrap_or_else(|| "|".into());
    let data = data
        .as_bytes()
        .ok_or_else(|| anyhow!("numpy array data is not bytes"))?;
    Ok(NdArray {
        dtype: format!("{order}{code}"),
        shape,
        data,
    })
}
