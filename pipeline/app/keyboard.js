() => {
  // Keyboard-only ranking on the Rank tab (pipeline/app/rank.py). One slot has the keyboard focus (an
  // outline): digits put it in that tier and move on to the next slot, arrows move the focus, letters
  // toggle its flags, Ctrl+Enter submits. Typing in the note box types; Esc leaves it.
  const FLAG_KEYS = { h: "harmful", t: "untruthful", e: "not English", r: "not rankable" };
  let focus = 0;
  const visible = (el) => el && el.offsetParent !== null;
  // Gradio renders a group's element id and classes on two nested divs: keep the outer one of each slot.
  const slots = () =>
    [...document.querySelectorAll(".rank-slot")].filter(
      (el) => visible(el) && !el.parentElement.closest(".rank-slot"),
    );
  const typing = (el) =>
    el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && !["radio", "checkbox"].includes(el.type)));
  const mark = () => {
    const list = slots();
    if (focus >= list.length) focus = 0;
    list.forEach((el, i) => el.classList.toggle("kb-focus", i === focus));
  };
  const flagBox = (slot, name) =>
    [...slot.querySelectorAll("input[type=checkbox]")].find((box) => box.closest("label").textContent.trim() === name);

  document.addEventListener("keydown", (event) => {
    const submit = document.querySelector("#rank-submit");
    if (!visible(submit)) return;
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      focus = 0;
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
    if (event.key === "ArrowDown" || event.key === "ArrowRight") {
      focus = Math.min(focus + 1, list.length - 1);
    } else if (event.key === "ArrowUp" || event.key === "ArrowLeft") {
      focus = Math.max(focus - 1, 0);
    } else if (/^[1-9]$/.test(event.key)) {
      const choice = list[focus].querySelector(`.rank-tier input[type=radio][value="${event.key}"]`);
      if (!choice) return;
      choice.click();
      focus = Math.min(focus + 1, list.length - 1);
    } else if (FLAG_KEYS[event.key]) {
      const box = flagBox(list[focus], FLAG_KEYS[event.key]);
      if (box) box.click();
    } else {
      return;
    }
    event.preventDefault();
    mark();
    list[focus].scrollIntoView({ block: "nearest" });
  });

  // A click (a person's, not the ones above) moves the focus to the slot clicked in.
  document.addEventListener("click", (event) => {
    const list = slots();
    const slot = event.isTrusted && list.find((el) => el.contains(event.target));
    if (slot) {
      focus = list.indexOf(slot);
      mark();
    }
  });

  // A new task replaces the slots' contents: start again at the first slot and show the outline.
  let shownTask = null;
  new MutationObserver(() => {
    const status = document.querySelector("#rank-status");
    const task = status ? status.textContent.match(/Task (\d+)/) : null;
    if (task && task[1] !== shownTask) {
      shownTask = task[1];
      focus = 0;
    }
    mark();
  }).observe(document.body, { childList: true, subtree: true, characterData: true });
}
