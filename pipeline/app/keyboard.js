() => {
  // The Rank tab's slots (pipeline/app/rank.py, render.ranking_html) from the keyboard and the mouse.
  // Every change to a slot's tier or flags is written into the tab's hidden answer field, which the
  // Submit button sends. One slot has the keyboard focus (an outline): digits put it in that tier and
  // move on, arrows move the focus, letters toggle its flags, Ctrl+Enter submits. In the note box keys
  // type text; Esc leaves it.
  const FLAG_KEYS = { h: "harmful", t: "untruthful", e: "not English", r: "not rankable" };
  let focus = 0;
  let shownTask = null;

  const visible = (el) => el && el.offsetParent !== null;
  const task = () => document.querySelector("#rank-task .rank-task");
  const slots = () => (visible(task()) ? [...task().querySelectorAll(".rank-slot")] : []);
  const typing = (el) =>
    el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && !["radio", "checkbox"].includes(el.type)));

  const mark = () => {
    const list = slots();
    if (focus >= list.length) focus = 0;
    list.forEach((el, i) => el.classList.toggle("kb-focus", i === focus));
  };

  const answer = () =>
    JSON.stringify({
      tiers: slots().map((slot) => {
        const chosen = slot.querySelector(".tiers input:checked");
        return chosen ? Number(chosen.value) : null;
      }),
      flags: slots().map((slot) => [...slot.querySelectorAll(".flags input:checked")].map((box) => box.value)),
    });

  // Set the hidden Gradio textbox the way typing would, so Gradio takes the new value.
  const sync = () => {
    const field = document.querySelector("#rank-answer textarea, #rank-answer input");
    if (!field) return;
    const setter = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(field), "value").set;
    setter.call(field, answer());
    field.dispatchEvent(new Event("input", { bubbles: true }));
  };

  document.addEventListener("change", (event) => {
    if (event.target.closest && event.target.closest(".rank-task")) sync();
  });

  document.addEventListener("keydown", (event) => {
    const submit = document.querySelector("#rank-submit");
    if (!visible(submit)) return;
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      sync();
      submit.click();
      return;
    }
    if (typing(event.target)) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    const list = slots();
    if (!list.length || event.altKey || event.ctrlKey || event.metaKey) return;
    if (focus >= list.length) focus = 0;
    const slot = list[focus];
    if (event.key === "ArrowDown" || event.key === "ArrowRight") {
      focus = Math.min(focus + 1, list.length - 1);
    } else if (event.key === "ArrowUp" || event.key === "ArrowLeft") {
      focus = Math.max(focus - 1, 0);
    } else if (/^[1-9]$/.test(event.key)) {
      const choice = slot.querySelector(`.tiers input[value="${event.key}"]`);
      if (!choice) return;
      choice.click(); // checks it and fires "change", which syncs the answer
      focus = Math.min(focus + 1, list.length - 1);
    } else if (FLAG_KEYS[event.key]) {
      const box = [...slot.querySelectorAll(".flags input")].find((b) => b.value === FLAG_KEYS[event.key]);
      if (box) box.click();
    } else {
      return;
    }
    event.preventDefault();
    mark();
    list[focus].scrollIntoView({ block: "nearest" });
  });

  // A person's click moves the focus to the slot clicked in (the clicks above are not a person's).
  document.addEventListener("click", (event) => {
    const list = slots();
    const slot = event.isTrusted && list.find((el) => el.contains(event.target));
    if (slot) {
      focus = list.indexOf(slot);
      mark();
    }
  });

  // A new task: start again at its first slot.
  new MutationObserver(() => {
    const current = task();
    const id = current ? current.dataset.task : null;
    if (id !== shownTask) {
      shownTask = id;
      focus = 0;
    }
    mark();
  }).observe(document.body, { childList: true, subtree: true });
}
