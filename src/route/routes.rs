//! The config's routes as runtime types, built once at start-up
//! ([`Routes::build`]): every category's plan and A/B variant, the
//! classifier's rules with their regexes compiled, a one-call plan per
//! model (budget downgrades). A route that cannot be built fails the start
//! with the key that names it; nothing is resolved, or can fail, per job.

use std::collections::BTreeMap;

use super::{bucket, Check, Plan, Stage, Target};
use crate::config::{err, CheckConfig, Config, ConfigError, RouteConfig};

/// See the module doc.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    categories: BTreeMap<String, CategoryRoutes>,
    classifier: Option<Classifier>,
    /// One call to each model of the config.
    singles: BTreeMap<String, Plan>,
}

#[derive(Debug, Clone)]
struct CategoryRoutes {
    plan: Plan,
    /// The A/B variant: its name, the share of jobs (0..100) and its plan.
    variant: Option<(String, u8, Plan)>,
}

#[derive(Debug, Clone)]
struct Classifier {
    rules: Vec<Rule>,
    /// The plan that asks the classifier model, if one is configured.
    model_plan: Option<Plan>,
    default_category: String,
}

#[derive(Debug, Clone)]
struct Rule {
    category: String,
    /// Keywords as written and lower-cased.
    keywords: Vec<(String, String)>,
    regex: Option<regex::Regex>,
}

impl Routes {
    /// Build every route of `cfg`; an error names the key.
    pub fn build(cfg: &Config) -> Result<Self, ConfigError> {
        let target = |key: String, model: &str| -> Result<Target, ConfigError> {
            cfg.models
                .get(model)
                .map(|m| Target {
                    model: model.to_string(),
                    provider: m.provider.clone(),
                })
                .ok_or_else(|| err(key, format!("unknown model `{model}`")))
        };
        let plan = |key: String, route: &RouteConfig| -> Result<Plan, ConfigError> {
            let plan = plan_of(&key, route, &target)?;
            plan.validate().map_err(|why| err(&key, why))?;
            Ok(plan)
        };
        let mut categories = BTreeMap::new();
        for (name, c) in &cfg.categories {
            let key = format!("categories.{name}");
            let variant = match &c.variant {
                Some(v) => Some((
                    v.name.clone(),
                    v.percent,
                    plan(format!("{key}.variant.route"), &v.route)?,
                )),
                None => None,
            };
            categories.insert(
                name.clone(),
                CategoryRoutes {
                    plan: plan(format!("{key}.route"), &c.route)?,
                    variant,
                },
            );
        }
        let classifier = match &cfg.classifier {
            None => None,
            Some(c) => {
                let mut rules = Vec::with_capacity(c.rules.len());
                for (i, r) in c.rules.iter().enumerate() {
                    let regex = match &r.regex {
                        Some(re) => Some(
                            regex::Regex::new(re)
                                .map_err(|e| err(format!("classifier.rules[{i}].regex"), e))?,
                        ),
                        None => None,
                    };
                    rules.push(Rule {
                        category: r.category.clone(),
                        keywords: r
                            .keywords
                            .iter()
                            .map(|k| (k.clone(), k.to_lowercase()))
                            .collect(),
                        regex,
                    });
                }
                let model_plan = match &c.model {
                    Some(m) => Some(Plan::Classify {
                        classifier: target("classifier.model".into(), m)?,
                        categories: cfg.categories.keys().cloned().collect(),
                        threshold: c.threshold,
                        default_category: c.default_category.clone(),
                    }),
                    None => None,
                };
                Some(Classifier {
                    rules,
                    model_plan,
                    default_category: c.default_category.clone(),
                })
            }
        };
        let singles = cfg
            .models
            .iter()
            .map(|(id, m)| {
                let target = Target {
                    model: id.clone(),
                    provider: m.provider.clone(),
                };
                (id.clone(), Plan::Single { target })
            })
            .collect();
        Ok(Self {
            categories,
            classifier,
            singles,
        })
    }

    /// A category's plan for a job; the A/B variant is chosen by a stable
    /// hash of the job id. The plan and the variant name, if taken.
    pub fn plan_for(&self, category: &str, job_id: &str) -> Option<(Plan, Option<String>)> {
        let c = self.categories.get(category)?;
        Some(match &c.variant {
            Some((name, percent, plan)) if bucket(job_id) < u64::from(*percent) => {
                (plan.clone(), Some(name.clone()))
            }
            _ => (c.plan.clone(), None),
        })
    }

    /// A plan of one call to `model` (a budget's downgrade).
    pub fn single_plan(&self, model: &str) -> Option<Plan> {
        self.singles.get(model).cloned()
    }

    /// Rules first: the category of the first rule whose keyword or regex
    /// matches the input, with a description of the rule.
    pub fn classify_by_rules(&self, input: &str) -> Option<(String, String)> {
        let c = self.classifier.as_ref()?;
        let lower = input.to_lowercase();
        for (i, r) in c.rules.iter().enumerate() {
            if let Some((k, _)) = r.keywords.iter().find(|(_, l)| lower.contains(l)) {
                return Some((r.category.clone(), format!("rules[{i}] keyword `{k}`")));
            }
            if r.regex.as_ref().is_some_and(|re| re.is_match(input)) {
                return Some((r.category.clone(), format!("rules[{i}] regex")));
            }
        }
        None
    }

    /// The plan for an `auto` job no rule matched: ask the classifier
    /// model, or (without one) `Err` with the default category. `None`
    /// without a classifier.
    pub fn classify_plan(&self) -> Option<Result<Plan, String>> {
        let c = self.classifier.as_ref()?;
        Some(
            c.model_plan
                .clone()
                .ok_or_else(|| c.default_category.clone()),
        )
    }
}

/// One route of the config as a plan (`key` names it in errors).
fn plan_of(
    key: &str,
    route: &RouteConfig,
    target: &impl Fn(String, &str) -> Result<Target, ConfigError>,
) -> Result<Plan, ConfigError> {
    let targets = |field: &str, models: &[String]| -> Result<Vec<Target>, ConfigError> {
        models
            .iter()
            .enumerate()
            .map(|(i, m)| target(format!("{key}.{field}[{i}]"), m))
            .collect()
    };
    Ok(match route {
        RouteConfig::Single { target: t } => Plan::Single {
            target: target(format!("{key}.target"), t)?,
        },
        RouteConfig::Fallback {
            targets: ts,
            max_wait_secs,
            check,
        } => Plan::Fallback {
            targets: targets("targets", ts)?,
            max_wait_ms: max_wait_secs.map(|s| s * 1000),
            check: match check {
                Some(CheckConfig::JsonSchema { schema }) => Some(Check::JsonSchema {
                    schema: serde_json::to_value(schema)
                        .map_err(|e| err(format!("{key}.check.schema"), e))?,
                }),
                Some(CheckConfig::Confidence { min }) => Some(Check::Confidence { min: *min }),
                None => None,
            },
        },
        RouteConfig::Pipeline { stages } => Plan::Pipeline {
            stages: stages
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Ok(Stage {
                        name: s.name.clone(),
                        target: target(format!("{key}.stages[{i}].target"), &s.target)?,
                        template: s.prompt.clone().unwrap_or_else(|| {
                            if i == 0 { "{{input}}" } else { "{{previous}}" }.to_string()
                        }),
                    })
                })
                .collect::<Result<_, ConfigError>>()?,
        },
        RouteConfig::Consensus {
            targets: ts,
            min_agree,
            judge,
        } => Plan::Consensus {
            voters: targets("targets", ts)?,
            min_agree: min_agree.unwrap_or(ts.len() / 2 + 1),
            judge: match judge {
                Some(j) => Some(target(format!("{key}.judge"), j)?),
                None => None,
            },
        },
    })
}
