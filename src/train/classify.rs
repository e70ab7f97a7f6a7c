//! A trained classifier opened from its directory: predictions and evaluation.

use super::classifier::{TrainError, POSITION_MULTIPLE};
use super::eval::{evaluate, Evaluation};
use crate::data::{self, EncodedExample, EncodedExamples, ReadOptions};
use crate::gpu::Gpu;
use crate::graph::executor::OptimizerSettings;
use crate::graph::Session;
use crate::model::gpt2::{build_graph_with, check_f16, check_f16_adapter, BatchShape, Head, Precision, Trainable};
use crate::model::load::{open_classifier, LoadedModel};
use std::collections::BTreeMap;
use std::path::Path;

/// One prediction.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    /// The input text.
    pub text: String,
    /// The label with the maximum probability.
    pub label: String,
    /// Probability of every label.
    pub probabilities: BTreeMap<String, f32>,
}

/// A classifier directory written by `shadertune train` or by transformers'
/// GPT2ForSequenceClassification.
pub struct Classifier {
    model: LoadedModel,
    labels: Vec<String>,
    precision: Precision,
}

impl Classifier {
    /// Opens `dir`; its config.json must name the labels (`id2label` or `num_labels`) and its
    /// model.safetensors must hold `score.weight`.
    pub fn open(dir: &Path) -> Result<Classifier, TrainError> {
        let config_path = dir.join("config.json");
        let config = crate::model::config::Gpt2Config::from_file(&config_path)
            .map_err(|error| crate::model::load::ModelError::Config { path: config_path.clone(), error })?;
        let labels: Vec<String> = match config.label_names() {
            Some(labels) => labels,
            None => {
                return Err(TrainError::Invalid(format!(
                    "{} names no labels (no id2label or num_labels): it is not a classifier; train one with `shadertune train`",
                    config_path.display()
                )))
            }
        };
        let weights_path = dir.join("model.safetensors");
        if !weights_path.is_file() {
            return Err(TrainError::Invalid(format!(
                "{} not found: a trained classifier directory needs its weights; pass the `model/` directory of a `shadertune train` run",
                weights_path.display()
            )));
        }
        let model = open_classifier(dir, labels.len(), 0)?;
        if model.new_head || model.random_init {
            return Err(TrainError::Invalid(format!(
                "{} has no trained classification head (score.weight); train one with `shadertune train`",
                dir.display()
            )));
        }
        Ok(Classifier { model, labels, precision: Precision::F32 })
    }

    /// Opens `dir`, or with `adapter` the base model `dir` with that LoRA adapter merged in;
    /// the merged model must have a trained classification head.
    pub fn open_with(dir: &Path, adapter: Option<&Path>) -> Result<Classifier, TrainError> {
        let Some(adapter) = adapter else { return Classifier::open(dir) };
        let merged = crate::model::lora::open_with_adapter(dir, adapter).map_err(|e| match e {
            crate::model::lora::MergeError::Model(e) => TrainError::Model(e),
            crate::model::lora::MergeError::Lora(e) => TrainError::Lora(e),
        })?;
        let Some(labels) = merged.labels else {
            return Err(TrainError::Invalid(format!(
                "the adapter in {} has no classification head (score) and {} is not a classifier; pass an adapter trained with `shadertune train --lora-rank`",
                adapter.display(),
                dir.display()
            )));
        };
        Ok(Classifier { model: merged.model, labels, precision: Precision::F32 })
    }

    /// Stores the linear weights of the blocks in `precision` on the device (all arithmetic stays
    /// f32); the default is f32.
    ///
    /// # Errors
    /// With f16, when the model's widths are not multiples of 8 (see [`check_f16`]).
    pub fn with_precision(mut self, precision: Precision) -> Result<Classifier, TrainError> {
        if precision == Precision::F16 {
            check_f16(&self.model.config).map_err(TrainError::Invalid)?;
        }
        self.precision = precision;
        Ok(self)
    }

    /// Storage of the linear weights of the blocks on the device.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Label names in class order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    fn session<'g>(&self, gpu: &'g Gpu, batch: usize, seq_len: usize) -> Result<Session<'g>, TrainError> {
        if self.precision == Precision::F16 {
            check_f16_adapter(gpu).map_err(TrainError::Invalid)?;
        }
        let head = Head::Classifier { num_labels: self.labels.len() };
        let (config, precision, max_binding) = (self.model.config.clone(), self.precision, gpu.limits().max_storage_buffer_binding_size);
        let graph_for = move |seq_len| build_graph_with(&config, head, BatchShape { batch, seq_len }, Trainable::Nothing, None, precision, max_binding);
        let mut session = Session::new(gpu, graph_for(seq_len), &self.model.weights, false, OptimizerSettings::default())?;
        session.allow_shorter_batches(POSITION_MULTIPLE, Box::new(graph_for));
        Ok(session)
    }

    /// Classifies `texts`; texts longer than the model's context keep their first n_positions tokens.
    pub fn predict(&self, gpu: &Gpu, texts: &[String], batch_size: usize) -> Result<Vec<Prediction>, TrainError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let n_positions = self.model.config.n_positions;
        let eos = self.model.tokenizer.eos_id();
        let examples: Vec<EncodedExample> = texts
            .iter()
            .map(|t| {
                let mut ids = self.model.tokenizer.encode(t);
                ids.truncate(n_positions);
                if ids.is_empty() {
                    ids.push(eos);
                }
                EncodedExample { ids, label: 0 }
            })
            .collect();
        let seq_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let data = EncodedExamples { examples, seq_len, truncated: 0, pad_id: eos };
        let batch = batch_size.clamp(1, texts.len());
        let mut session = self.session(gpu, batch, seq_len)?;
        // A full evaluation batches texts by length and returns its results in input order; the
        // placeholder labels only enter its loss, which is not used.
        let eval = evaluate(&mut session, &data, batch, self.labels.len(), None)?;
        let out = texts
            .iter()
            .zip(eval.predictions.iter().zip(&eval.probabilities))
            .map(|(text, (&predicted, probs))| Prediction {
                text: text.clone(),
                label: self.labels[predicted].clone(),
                probabilities: self.labels.iter().cloned().zip(probs.iter().copied()).collect(),
            })
            .collect();
        Ok(out)
    }

    /// Evaluates the classifier on a labelled file; labels must be among the model's.
    pub fn evaluate_file(
        &self,
        gpu: &Gpu,
        path: &Path,
        read: &ReadOptions,
        batch_size: usize,
        max_length: Option<usize>,
    ) -> Result<(Evaluation, crate::data::Dataset, usize, usize), TrainError> {
        let dataset = data::read_labelled(path, read)?;
        for label in &dataset.label_names {
            if !self.labels.contains(label) {
                return Err(TrainError::Invalid(format!(
                    "{}: label `{label}` is not one of the model's labels ({})",
                    path.display(),
                    self.labels.join(", ")
                )));
            }
        }
        let encoded = data::encode_examples(
            &self.model.tokenizer,
            &dataset.examples,
            &self.labels,
            max_length,
            self.model.config.n_positions,
        )?;
        let mut session = self.session(gpu, batch_size, encoded.seq_len)?;
        let eval = evaluate(&mut session, &encoded, batch_size, self.labels.len(), None)?;
        Ok((eval, dataset, encoded.seq_len, encoded.truncated))
    }
}
