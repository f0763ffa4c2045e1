// ScratchChat's Compare view: the base model's and the finetuned model's answers to the same message, side by
// side. chat_app.py streams into it by updating `props` ({question, sides: [{title, role, text, footer}], done}).
// Chainlit injects `props` as a global (not as a function argument).
export default function Compare() {
  const sides = props.sides || [];
  return (
    // inline grid style: custom elements only get the Tailwind classes Chainlit's own bundle already contains
    <div className="w-full" style={{ display: "grid", gridTemplateColumns: "repeat(2, minmax(0, 1fr))", gap: "0.75rem" }}
         data-testid="compare-view" data-done={props.done ? "true" : "false"}>
      {sides.map((side, i) => (
        <div key={i} className="rounded-lg border border-border p-3 flex flex-col gap-2 min-w-0"
             data-testid={"compare-" + side.role}>
          <div className="text-xs uppercase tracking-wide text-muted-foreground">{side.role}</div>
          <div className="font-semibold break-words">{side.title}</div>
          <div className="whitespace-pre-wrap break-words text-sm">
            {side.text || (props.done ? "(empty answer)" : "…")}
          </div>
          {side.footer ? (
            <div className="text-xs italic text-muted-foreground break-words">{side.footer}</div>
          ) : null}
        </div>
      ))}
    </div>
  );
}
